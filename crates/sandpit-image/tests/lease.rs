//! Leases keep a sandbox's layers from `gc` and `remove`, across processes
//! (each `ImageStore::open` below stands for another process).

use std::collections::HashSet;
use std::sync::Arc;

use sandpit_image::{Digest, IdShift, ImageConfig, ImageError, ImageStore, Reference};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn one_file_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_600_000_000);
    header.set_cksum();
    builder.append_data(&mut header, name, data).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn leased_layers_survive_remove_and_gc_until_released() {
    // Unpacking chowns into the sandbox id range: root only.
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = ImageStore::open(dir.path(), IdShift::default()).unwrap();
    let cli = ImageStore::open(dir.path(), IdShift::default()).unwrap();
    let reference = Reference::parse("sandpit.test/leased:1").unwrap();
    let image = daemon
        .import_rootfs_tar(
            &reference,
            &one_file_tar("hello", b"world")[..],
            ImageConfig::default(),
        )
        .unwrap();
    daemon.lease("sandbox-abc", &image.layers).unwrap();
    assert_eq!(daemon.lease_holders().unwrap(), ["sandbox-abc"]);

    // Another process removes the image: the record goes, the layer stays.
    cli.remove(&reference).unwrap();
    assert!(matches!(cli.get(&reference), Err(ImageError::NotFound(_))));
    assert!(cli.has_layer(&image.layers[0]));
    assert_eq!(cli.gc(&HashSet::new()).unwrap(), Vec::<String>::new());
    assert!(daemon.layer_path(&image.layers[0]).join("hello").is_file());

    // Released (twice is fine): the next gc collects it.
    daemon.release("sandbox-abc").unwrap();
    daemon.release("sandbox-abc").unwrap();
    assert!(daemon.lease_holders().unwrap().is_empty());
    assert_eq!(cli.gc(&HashSet::new()).unwrap(), image.layers);
    assert!(!cli.has_layer(&image.layers[0]));

    // A lease on a layer that is gone fails and leaves no lease behind.
    assert!(matches!(
        daemon.lease("sandbox-late", &image.layers),
        Err(ImageError::LayerNotFound(_))
    ));
    assert!(daemon.lease_holders().unwrap().is_empty());
    assert!(matches!(
        daemon.lease("../escape", &[]),
        Err(ImageError::InvalidLeaseHolder(_))
    ));
}

/// What the daemon and `sandpit run` do: lease, create the sandbox, keep
/// the lease only if creating worked.
fn create_sandbox(
    store: &Arc<ImageStore>,
    holder: &str,
    layers: &[Digest],
    create: impl FnOnce() -> Result<(), &'static str> + Send + 'static,
) -> Result<(), &'static str> {
    let lease = store.lease_guard_owned(holder, layers).unwrap();
    // The daemon runs this on a blocking thread: the guard goes with it.
    std::thread::spawn(move || {
        create()?;
        lease.keep();
        Ok(())
    })
    .join()
    .unwrap()
}

#[test]
fn lease_guards_across_store_handles() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Arc::new(ImageStore::open(dir.path(), IdShift::default()).unwrap());
    let cli = ImageStore::open(dir.path(), IdShift::default()).unwrap();
    let reference = Reference::parse("sandpit.test/guarded:1").unwrap();
    let image = daemon
        .import_rootfs_tar(
            &reference,
            &one_file_tar("hello", b"guarded")[..],
            ImageConfig::default(),
        )
        .unwrap();

    // Creating fails: the guard is dropped and the lease released, so the
    // other process's `image rm` collects the layer.
    assert_eq!(
        create_sandbox(&daemon, "sandbox-failed", &image.layers, || Err("no")),
        Err("no")
    );
    assert!(cli.lease_holders().unwrap().is_empty());

    // Creating works: the lease is kept past the guard.
    create_sandbox(&daemon, "sandbox-ok", &image.layers, || Ok(())).unwrap();
    assert_eq!(cli.lease_holders().unwrap(), ["sandbox-ok"]);
    cli.remove(&reference).unwrap();
    assert_eq!(cli.gc(&HashSet::new()).unwrap(), Vec::<Digest>::new());
    assert!(cli.layer_path(&image.layers[0]).join("hello").is_file());

    // A borrowed guard dropped on the spot releases too; the kept lease of
    // the other holder still protects the layer.
    drop(daemon.lease_guard("sandbox-brief", &image.layers).unwrap());
    assert_eq!(cli.lease_holders().unwrap(), ["sandbox-ok"]);
    assert_eq!(cli.gc(&HashSet::new()).unwrap(), Vec::<Digest>::new());

    // Destroyed: released as before, and collected.
    daemon.release("sandbox-ok").unwrap();
    assert_eq!(cli.gc(&HashSet::new()).unwrap(), image.layers);

    // A guard over a layer that is gone is never made.
    assert!(matches!(
        daemon.lease_guard_owned("sandbox-late", &image.layers),
        Err(ImageError::LayerNotFound(_))
    ));
    assert!(cli.lease_holders().unwrap().is_empty());
}
