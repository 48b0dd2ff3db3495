//! A real PostgreSQL server for one test: Debian's binaries, a data dir of
//! its own (initdb, ~1 s), loopback only, stopped and removed on drop.
//!
//! Where the binaries are missing the test is skipped with a reason, unless
//! `SANDPIT_REQUIRE_POSTGRES=1` (scripts/test.sh sets it: in CI a missing
//! PostgreSQL is a failure, not a skip).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

/// The newest installed major version's binaries.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// The uid and gid of `postgres` (it refuses to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[derive(Debug)]
pub(crate) struct Pg {
    bin: PathBuf,
    dir: tempfile::TempDir,
    user: Option<(u32, u32)>,
    pub(crate) port: u16,
    child: Option<Child>,
}

impl Pg {
    /// A started server, or None (after saying why) where PostgreSQL is
    /// not installed and the environment does not require it.
    pub(crate) fn start() -> Option<Pg> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("SANDPIT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "PostgreSQL is required (SANDPIT_REQUIRE_POSTGRES=1) and not installed: \
                 apt-get install postgresql (scripts/install-deps.sh does)"
            );
            eprintln!("skipped: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = if root {
            Some(postgres_user().expect("a postgres user (Debian's package makes it)"))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("sandpit-pg.")
            .tempdir()
            .expect("a temporary dir");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the data dir");
        }
        let mut pg = Pg {
            bin,
            dir,
            user,
            port: free_port(),
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "sandpit", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "-D"])
            .arg(pg.data())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.run();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log file");
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(uid), Some(gid))
                .expect("chown the log");
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            // A test server: durability against a host crash is not the point
            // (a server crash loses nothing committed even so: the WAL is
            // written, only not flushed to the disk).
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://sandpit@127.0.0.1:{}/postgres", self.port)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// `signal` to the postmaster (SIGINT: fast shutdown; SIGQUIT:
    /// immediate, as a crash, with recovery on the next start), then waits.
    fn stop_with(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet
        // (so not reused); no memory is involved.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its backends end with it; wait until the last lets go of the dir.
        let pidfile = self.data().join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while pidfile.exists() && signal != libc::SIGQUIT && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A crash and a start again on the same port and data.
    pub(crate) fn crash_and_restart(&mut self) {
        self.stop_with(libc::SIGQUIT);
        // The immediate shutdown leaves its pid file; the next start
        // checks that no process holds it.
        self.run();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop_with(libc::SIGINT);
    }
}
