//! What the engine reads about a sandbox's PID 1 from `/proc`, and how it
//! waits for it to go.

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub(crate) fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

pub(crate) fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').next().map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(false)
}

/// Waits (briefly, with backoff) until the sandbox's PID 1 is a zombie or
/// gone. The kernel kills and reaps the rest of the PID namespace before
/// PID 1 finishes exiting, so afterwards the cgroup holds nothing alive and
/// teardown needs no freeze.
pub(crate) fn wait_gone(pid: i32, start_time: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut pause = std::time::Duration::from_micros(100);
    while process_start_time(pid) == Some(start_time)
        && !is_zombie(pid)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    }
}

/// Collects the exit status of a sandbox's PID 1 when this process is its
/// reaper (a subreaper daemon); harmless otherwise.
pub(crate) fn reap(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    for _ in 0..200 {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_readable_and_stable() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(t));
        assert!(!is_zombie(me));
        assert_eq!(process_start_time(i32::MAX), None);
    }
}
