//! The manager and the `sandpitd` binary over the real engine: namespaces,
//! cgroups, overlayfs and the static agent. Needs root, the agent
//! (`scripts/build-agent.sh`, or `SANDPIT_AGENT`), `sandpit-spawn` (`cargo
//! build -p sandpit-runtime --bins`, or `SANDPIT_SPAWN`) and
//! `.cache/images/busybox.tar` (`scripts/build-test-images.sh`).
#![cfg(feature = "privileged-tests")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpit_image::{IdShift, ImageConfig, ImageStore, Reference};
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_server::clock::SystemClock;
use sandpit_server::db::Db;
use sandpit_server::local::{LocalEngine, LocalEngineConfig};
use sandpit_server::logs::{FileSink, LogReader, Next};
use sandpit_server::manager::{Manager, ManagerConfig};
use sandpit_server::model::{
    NewSandbox, Principal, ResourceSpec, Resources, SandboxId, SandboxRecord, State,
};
use tonic::transport::Channel;
use tonic::Request;

const CGROUP_PARENT: &str = "sandpit-server-test";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn agent() -> PathBuf {
    let path = std::env::var_os("SANDPIT_AGENT")
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

fn spawner() -> PathBuf {
    let path = std::env::var_os("SANDPIT_SPAWN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test> -> target/<profile>/sandpit-spawn
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("sandpit-spawn")
        });
    assert!(
        path.is_file(),
        "{} missing: cargo build -p sandpit-runtime --bins",
        path.display()
    );
    path
}

/// A data dir whose store holds busybox as `busybox:latest`.
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sandpitd-test")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let store = ImageStore::open(&dir.path().join("store"), IdShift::default()).unwrap();
    let tar = workspace().join(".cache/images/busybox.tar");
    let f = std::fs::File::open(&tar)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/build-test-images.sh", tar.display()));
    store
        .import_rootfs_tar(
            &Reference::parse("busybox:latest").unwrap(),
            f,
            ImageConfig {
                env: vec!["PATH=/bin:/usr/bin".into()],
                ..Default::default()
            },
        )
        .unwrap();
    dir
}

fn engine(data: &Path) -> LocalEngine {
    LocalEngine::new(LocalEngineConfig {
        storage: None,
        disk_pool: None,
        lxcfs: None,
        store_dir: data.join("store"),
        state_dir: data.join("sandboxes"),
        agent_binary: agent(),
        spawner_binary: spawner(),
        cgroup_parent: CGROUP_PARENT.into(),
        pids_max: Some(512),
        registry: Default::default(),
        // The network has tests of its own (sandpit-net, and the daemon's
        // end-to-end tests): these run side by side with them.
        network: None,
    })
    .unwrap()
}

fn sh(script: &str) -> NewSandbox {
    NewSandbox {
        image: "docker.io/library/busybox:latest".into(),
        command: Some("sh".into()),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

async fn wait_terminal(m: &Manager<LocalEngine>, id: &SandboxId) -> SandboxRecord {
    let p = Principal("p".into());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = m.get(&p, id).unwrap();
        if r.state.is_terminal() {
            return r;
        }
        assert!(Instant::now() < deadline, "{id} still {}", r.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_over_the_local_engine() {
    let data = data_dir();
    let logs = data.path().join("logs");
    let m = Manager::start(
        ManagerConfig::default(),
        engine(data.path()),
        Db::open(&data.path().join("sandpitd.db")).unwrap(),
        Arc::new(SystemClock),
        Arc::new(FileSink::new(&logs).unwrap()),
    )
    .await
    .unwrap();
    let p = Principal("p".into());

    // Exit code and output.
    let t = Instant::now();
    let r = m
        .create(&p, sh("echo hello; echo oops >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(r.state, State::Running, "{}", r.state_reason);
    assert!(t.elapsed() < Duration::from_secs(5));
    let r = wait_terminal(&m, &r.id).await;
    assert_eq!(r.state, State::Failed);
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.state_reason, "main process exited with code 3");
    let mut cursor = LogReader::new(&logs).cursor(&r.id);
    cursor.seek(0).unwrap();
    let mut out = String::new();
    while let Next::Record(rec) = cursor.next().unwrap() {
        out.push_str(&String::from_utf8_lossy(&rec.data));
    }
    assert!(out.contains("hello\n") && out.contains("oops\n"), "{out:?}");
    // The engine's resources are gone.
    assert!(!data.path().join("sandboxes").join(r.id.as_str()).exists());

    let ok = m.create(&p, sh("true")).await.unwrap();
    let ok = wait_terminal(&m, &ok.id).await;
    assert_eq!((ok.state, ok.exit_code), (State::Completed, Some(0)));

    // Memory limit: the OOM killer ends it.
    let hog = m
        .create(
            &p,
            NewSandbox {
                resources: ResourceSpec {
                    limits: Resources {
                        memory_bytes: Some(32 << 20),
                        cpu_millis: Some(500),
                    },
                    ..Default::default()
                },
                ..sh("exec tail -c 300000000 /dev/zero")
            },
        )
        .await
        .unwrap();
    let hog = wait_terminal(&m, &hog.id).await;
    assert_eq!(hog.state, State::Failed);
    assert_eq!(hog.state_reason, "out of memory");

    // A bad command fails to start.
    let bad = m
        .create(
            &p,
            NewSandbox {
                command: Some("/nope".into()),
                args: vec![],
                ..sh("")
            },
        )
        .await
        .unwrap();
    let bad = wait_terminal(&m, &bad.id).await;
    assert_eq!(bad.state, State::Failed);
    assert!(
        bad.state_reason.starts_with("main command failed to start"),
        "{}",
        bad.state_reason
    );

    // A graceful stop: the trap makes it exit 0 on SIGTERM.
    let svc = m
        .create(&p, sh("trap 'exit 0' TERM; sleep 1000 & wait"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let d = m
        .delete(&p, &svc.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(d.state, State::Terminated);
    assert_eq!(d.exit_code, Some(0));

    // SIGTERM ignored: killed when the grace runs out.
    let stubborn = m
        .create(&p, sh("trap '' TERM; while :; do sleep 1; done"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let d = m
        .delete(&p, &stubborn.id, Duration::from_secs(1), false)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(d.state, State::Terminated);
    assert_eq!(d.exit_code, Some(137));
    assert!(!data
        .path()
        .join("sandboxes")
        .join(stubborn.id.as_str())
        .exists());

    // No main command at all: it idles until stopped.
    let idle = m
        .create(
            &p,
            NewSandbox {
                command: None,
                args: vec![],
                ..sh("")
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.get(&p, &idle.id).unwrap().state, State::Running);
    assert!(m
        .agent_for(&p, &idle.id)
        .await
        .unwrap()
        .ping()
        .await
        .is_ok());
    let d = m
        .delete(&p, &idle.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.state, State::Terminated);
}

/// A `sandpitd` child process.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(data: &Path, extra: &[&str]) -> Self {
        // Loopback-only sandboxes: these daemons run side by side (and next
        // to the networking tests' own), and one network layout per host
        // is all a host takes.
        let config = data.join("sandpitd.toml");
        std::fs::write(&config, "[network]\nenabled = false\n").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandpitd"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .arg("--config")
            .arg(&config)
            .env("SANDPIT_AGENT", agent())
            .env("SANDPIT_SPAWN", spawner())
            .env_remove("SANDPIT_API_KEYS")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("sandpitd: {line}");
                if let Some(addr) = line.strip_prefix("sandpitd listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("sandpitd printed its address");
        Self { child, addr }
    }

    async fn client(&self) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn authed<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn create(script: &str) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(pb::SandboxSpec {
                containers: vec![pb::Container {
                    name: "main".into(),
                    image: "busybox".into(),
                    command: "sh".into(),
                    args: vec!["-c".into(), script.into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn get(c: &mut SandboxServiceClient<Channel>, key: &str, id: &str) -> pb::SandboxStatus {
    c.get_sandbox(authed(
        pb::GetSandboxRequest {
            sandbox_id: id.into(),
        },
        key,
    ))
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_survives_restarts_and_kill_9() {
    use nix::sys::signal::Signal;
    let data = data_dir();

    // No key configured: one is generated, 0600.
    let mut d = Daemon::start(data.path(), &[]);
    let key_file = data.path().join("api-key");
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut c = d.client().await;
    let long = c
        .create_sandbox(authed(
            create("trap 'exit 0' TERM; sleep 1000 & wait"),
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.status.unwrap().state(), pb::State::Running);
    let long = long.sandbox_id;

    // SIGTERM: a clean exit, sandboxes untouched.
    assert!(d.signal(Signal::SIGTERM).success());
    let mut d = Daemon::start(data.path(), &[]);
    let mut c = d.client().await;
    assert_eq!(get(&mut c, &key, &long).await.state(), pb::State::Running);

    // Sandboxes that change while the daemon is dead (kill -9).
    let exits = c
        .create_sandbox(authed(create("sleep 1; exit 5"), &key))
        .await
        .unwrap()
        .into_inner()
        .sandbox_id;
    let doomed = c
        .create_sandbox(authed(create("sleep 1000"), &key))
        .await
        .unwrap()
        .into_inner()
        .sandbox_id;
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            data.path()
                .join("sandboxes")
                .join(&doomed)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let doomed_pid = state["pid"].as_i64().unwrap() as i32;
    d.signal(Signal::SIGKILL);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(doomed_pid), Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let d = Daemon::start(data.path(), &[]);
    let mut c = d.client().await;
    assert_eq!(get(&mut c, &key, &long).await.state(), pb::State::Running);
    let st = get(&mut c, &key, &doomed).await;
    assert_eq!(st.state(), pb::State::Failed);
    assert_eq!(st.state_reason, "sandbox vanished while sandpitd was down");
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = get(&mut c, &key, &exits).await;
        if st.state() != pb::State::Running || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st.state(), pb::State::Failed);
    assert_eq!(st.exit_code, Some(5));

    let stopped = c
        .delete_sandbox(authed(
            pb::DeleteSandboxRequest {
                sandbox_id: long.clone(),
                grace_period_seconds: 10,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap()
        .status
        .unwrap();
    assert_eq!(stopped.state(), pb::State::Terminated);
    assert_eq!(stopped.exit_code, Some(0));
    for id in [&long, &doomed, &exits] {
        assert!(!data.path().join("sandboxes").join(id).exists(), "{id}");
    }
}
