//! What the engine's privileged tests share: the image store with the test
//! images, a runtime per name, specs and sandbox guards, exec helpers.

// Each test file uses its own part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sandpit_image::{IdShift, ImageConfig, ImageStore, Reference};
use sandpit_runtime::cgroup::Limits;
use sandpit_runtime::{Runtime, RuntimeConfig, Sandbox, SandboxId, SandboxSpec};
use sandpit_wire::client::{AgentClient, Output};
use sandpit_wire::{ExecRequest, ExitStatus, InitSpec, MainStatus};

pub(crate) const HOST_BASE: u32 = 1_000_000_000;

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandpit-privileged")
}

pub(crate) fn agent_binary() -> PathBuf {
    let path = std::env::var_os("SANDPIT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent")
        });
    assert!(
        path.is_file(),
        "{} missing: run scripts/build-agent.sh",
        path.display()
    );
    path
}

pub(crate) fn store() -> &'static ImageStore {
    static STORE: OnceLock<ImageStore> = OnceLock::new();
    STORE.get_or_init(|| ImageStore::open(&data_dir().join("store"), IdShift::default()).unwrap())
}

/// Layers of a test image, imported from `.cache/images/<file>` once.
pub(crate) fn layers(file: &str) -> Vec<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    let reference =
        Reference::parse(&format!("sandpit.test/{}:latest", file.replace('.', "-"))).unwrap();
    let image = match store().get(&reference) {
        Ok(image) => image,
        Err(_) => {
            let tar = workspace().join(".cache/images").join(file);
            let f = std::fs::File::open(&tar).unwrap_or_else(|e| {
                panic!("{}: {e}: run scripts/build-test-images.sh", tar.display())
            });
            store()
                .import_rootfs_tar(&reference, f, ImageConfig::default())
                .unwrap()
        }
    };
    store().lower_dirs(&image)
}

pub(crate) fn busybox() -> Vec<PathBuf> {
    static L: OnceLock<Vec<PathBuf>> = OnceLock::new();
    L.get_or_init(|| layers("busybox.tar")).clone()
}

pub(crate) fn python() -> Vec<PathBuf> {
    static L: OnceLock<Vec<PathBuf>> = OnceLock::new();
    L.get_or_init(|| layers("python311.tar")).clone()
}

pub(crate) fn new_runtime(name: &str) -> Runtime {
    Runtime::new(RuntimeConfig {
        state_dir: data_dir().join(format!("state-{name}")),
        agent_binary: agent_binary(),
        spawner_binary: PathBuf::from(env!("CARGO_BIN_EXE_sandpit-spawn")),
        id_map: sandpit_runtime::IdMap::default(),
        cgroup_parent: format!("sandpit-test-{name}"),
        disk_pool: None,
        lxcfs: None,
    })
    .unwrap()
}

pub(crate) fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| new_runtime("main"))
}

pub(crate) fn unique_id(prefix: &str) -> SandboxId {
    static N: AtomicU32 = AtomicU32::new(0);
    SandboxId::parse(&format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
    .unwrap()
}

pub(crate) fn spec(prefix: &str, layers: Vec<PathBuf>, argv: &[&str]) -> SandboxSpec {
    SandboxSpec {
        id: unique_id(prefix),
        hostname: None,
        lower_dirs: layers,
        init: InitSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![(
                "PATH".into(),
                "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
            )],
            cwd: "/".into(),
            ..Default::default()
        },
        limits: Limits::default(),
        read_only_root: false,
        network_namespace: None,
        mounts: Vec::new(),
        disk_bytes: None,
    }
}

/// Destroys the sandbox when the test ends, pass or fail.
pub(crate) struct Guard<'a> {
    pub(crate) rt: &'a Runtime,
    pub(crate) sb: Sandbox,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.rt.destroy(self.sb.id());
    }
}

impl std::ops::Deref for Guard<'_> {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sb
    }
}

pub(crate) fn start(rt: &Runtime, spec: SandboxSpec) -> Guard<'_> {
    let sb = rt.create(&spec).unwrap();
    Guard { rt, sb }
}

pub(crate) fn exec(agent: &AgentClient, argv: &[&str]) -> Output {
    agent
        .run(
            ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            None,
        )
        .unwrap()
}

pub(crate) fn sh(agent: &AgentClient, script: &str) -> (String, ExitStatus) {
    let out = exec(agent, &["sh", "-c", script]);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

pub(crate) fn probe(sb: &Sandbox) -> serde_json::Value {
    let out = exec(&sb.agent(), &["/dev/.sandpit-agent", "probe"]);
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn wait_main_exit(agent: &AgentClient) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match agent.ping().unwrap() {
            MainStatus::Exited(s) => return s,
            other => assert!(Instant::now() < deadline, "main still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
