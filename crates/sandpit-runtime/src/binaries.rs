//! Where the engine's two helper binaries are found, and the check that the
//! agent is one that can run inside any image (statically linked).

use std::path::{Path, PathBuf};

/// Environment variable that overrides where the static agent is found.
pub const AGENT_ENV: &str = "SANDPIT_AGENT";
/// Environment variable that overrides where `sandpit-spawn` is found.
pub const SPAWNER_ENV: &str = "SANDPIT_SPAWN";

/// Where the static agent is looked for: `$SANDPIT_AGENT`, the output of
/// `scripts/build-agent.sh` relative to the running binary's directory
/// (`target/release/` -> `target/agent/...`), then `/usr/libexec/sandpit/`.
pub fn default_agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(AGENT_ENV) {
        return PathBuf::from(p);
    }
    let candidates = exe_dir()
        .map(|d| d.join("../agent/x86_64-unknown-linux-gnu/release/sandpit-agent"))
        .into_iter()
        .chain([PathBuf::from("/usr/libexec/sandpit/sandpit-agent")]);
    first_file(candidates, "/usr/libexec/sandpit/sandpit-agent")
}

/// Where `sandpit-spawn` is looked for: `$SANDPIT_SPAWN`, next to the running
/// binary, then `/usr/libexec/sandpit/`.
pub fn default_spawner_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(SPAWNER_ENV) {
        return PathBuf::from(p);
    }
    let candidates = exe_dir()
        .map(|d| d.join("sandpit-spawn"))
        .into_iter()
        .chain([PathBuf::from("/usr/libexec/sandpit/sandpit-spawn")]);
    first_file(candidates, "/usr/libexec/sandpit/sandpit-spawn")
}

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

fn first_file(candidates: impl Iterator<Item = PathBuf>, fallback: &str) -> PathBuf {
    candidates
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// Whether an ELF executable asks for a program interpreter (`PT_INTERP`).
pub(crate) fn is_dynamically_linked(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    Ok(elf_has_interpreter(&head).unwrap_or(false))
}

/// Scans the program headers of a little-endian ELF64 image; `None` when the
/// bytes are not one (or the headers lie beyond what was read).
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?) as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interpreter_detection() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamically_linked(&me).unwrap());
        assert_eq!(elf_has_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(elf_has_interpreter(b""), None);
        // A truncated header is not trusted either way.
        let head = std::fs::read(&me).unwrap();
        assert_eq!(elf_has_interpreter(&head[..0x30]), None);
    }
}
