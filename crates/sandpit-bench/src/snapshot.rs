//! `--only snapshot`: file-system snapshots of a volume (`sandpit-snapshot`)
//! into the local blob store and back, next to `tar | zstd -1` and
//! `zstd -dc | tar -x` on the same tree in the same run.
//!
//! The volume: 1,000 files of 100 kB (100 MB) in 10 directories, content
//! reproducible, half of the files compressible (text-like lines), half
//! not (xorshift noise). Each iteration deletes the blob first (otherwise
//! dedup would skip the put) and restores into a fresh directory. Ours
//! fsyncs the blob before renaming it in; the baseline does not sync.
//! Page cache warm for both (one untimed round first).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandpit_image::IdShift;
use sandpit_snapshot::{restore_dir, snapshot_dir, BlobStore, Limits, LocalBlobStore};

use crate::daemon::Figure;
use crate::Stats;

const FILES: usize = 1000;
const FILE_BYTES: usize = 100_000;
const CONTENT: usize = FILES * FILE_BYTES;

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Log-like lines: compresses several times over, not trivially.
fn text(seed: u64, n: usize) -> Vec<u8> {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "sandbox", "volume",
    ];
    let r = noise(seed, n / 8 + 16);
    let mut out = Vec::with_capacity(n + 64);
    let mut i = 0;
    while out.len() < n {
        let line = format!(
            "{:08} {} {} {}\n",
            i,
            words[usize::from(r[i % r.len()]) % words.len()],
            words[usize::from(r[(i + 1) % r.len()]) % words.len()],
            r[(i + 2) % r.len()]
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

fn make_volume(dir: &Path, shift: IdShift) -> Result<()> {
    for i in 0..FILES {
        let sub = dir.join(format!("d{:02}", i / 100));
        fs::create_dir_all(&sub)?;
        let data = if i % 2 == 0 {
            text(i as u64, FILE_BYTES)
        } else {
            noise(i as u64, FILE_BYTES)
        };
        let path = sub.join(format!("f{i:04}"));
        fs::write(&path, data)?;
        // Owned by the sandbox's root, as a volume would be.
        std::os::unix::fs::lchown(&path, Some(shift.base), Some(shift.base))?;
    }
    Ok(())
}

fn sh(script: &str) -> Result<()> {
    let status = Command::new("sh").args(["-c", script]).status()?;
    if !status.success() {
        bail!("`{script}` failed: {status}");
    }
    Ok(())
}

fn fresh(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    Ok(())
}

fn range(name: &str, samples: &[Duration]) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "snapshot: {name}: median {:.0} ms, range {:.0}-{:.0} ms, {:.0} MB/s",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        CONTENT as f64 / 1e3 / ms[ms.len() / 2]
    );
}

/// The snapshot measures, `iterations` of each.
pub(crate) fn run(data_dir: &Path, iterations: usize) -> Result<(Vec<Stats>, Vec<Figure>)> {
    let iterations = iterations.max(1);
    let root = data_dir.join(format!("snapshot-{}", std::process::id()));
    fresh(&root)?;
    let shift = IdShift::default();
    let vol = root.join("vol");
    fs::create_dir(&vol)?;
    make_volume(&vol, shift)?;
    let store = LocalBlobStore::open(&root.join("blobs"))?;
    let limits = Limits::default();
    let out = root.join("baseline.tar.zst");
    let (vol_s, out_s) = (vol.display(), out.display());

    let (mut snap, mut restore, mut tar_c, mut tar_x) = (vec![], vec![], vec![], vec![]);
    let mut blob_size = 0;
    for i in 0..=iterations {
        let warmup = i == 0;
        let t = Instant::now();
        let (blob, stats) = snapshot_dir(&vol, shift, &limits, &store, &store.staging_dir())?;
        let d_snap = t.elapsed();
        if stats.files != FILES as u64 || stats.content_bytes != CONTENT as u64 {
            bail!("snapshot saw {stats:?}");
        }
        blob_size = blob.size;

        let dst = root.join("restored");
        fresh(&dst)?;
        let t = Instant::now();
        restore_dir(&store, &blob, &dst, shift, &limits)?;
        let d_restore = t.elapsed();
        store.delete(&blob.digest)?;

        let t = Instant::now();
        sh(&format!("tar -C {vol_s} -cf - . | zstd -1 -q > {out_s}"))?;
        let d_tar_c = t.elapsed();
        let new = root.join("untarred");
        fresh(&new)?;
        let t = Instant::now();
        sh(&format!(
            "zstd -dc {out_s} | tar -C {} -xf -",
            new.display()
        ))?;
        let d_tar_x = t.elapsed();
        if !warmup {
            snap.push(d_snap);
            restore.push(d_restore);
            tar_c.push(d_tar_c);
            tar_x.push(d_tar_x);
        }
    }
    // The restored tree is the volume.
    let probe = Path::new("d09/f0999");
    if fs::read(vol.join(probe))? != fs::read(root.join("restored").join(probe))? {
        bail!("restored content differs");
    }
    let tar_size = fs::metadata(&out).context("baseline archive")?.len();

    range("snapshot_dir", &snap);
    range("restore_dir", &restore);
    range("tar -cf - | zstd -1", &tar_c);
    range("zstd -dc | tar -xf -", &tar_x);
    let stats = vec![
        Stats::new("snapshot_dir 100 MB / 1000 files (local store)", snap).with_bytes(CONTENT),
        Stats::new("restore_dir 100 MB / 1000 files (local store)", restore).with_bytes(CONTENT),
        Stats::new("tar -cf - . | zstd -1 > out (baseline)", tar_c).with_bytes(CONTENT),
        Stats::new("zstd -dc out | tar -xf - (baseline)", tar_x).with_bytes(CONTENT),
    ];
    let p50 = |i: usize| stats[i].p50().as_secs_f64();
    let figure = |name: &str, value: f64, unit: &'static str| Figure {
        name: name.into(),
        value,
        unit,
    };
    let figs = vec![
        figure("snapshot blob size", blob_size as f64 / 1e6, "MB"),
        figure("tar | zstd -1 archive size", tar_size as f64 / 1e6, "MB"),
        figure(
            "snapshot compression (content / blob)",
            CONTENT as f64 / blob_size as f64,
            "x",
        ),
        figure(
            "snapshot_dir time / tar | zstd time (p50)",
            p50(0) / p50(2),
            "x",
        ),
        figure(
            "restore_dir time / zstd -dc | tar time (p50)",
            p50(1) / p50(3),
            "x",
        ),
    ];
    fs::remove_dir_all(&root)?;
    Ok((stats, figs))
}
