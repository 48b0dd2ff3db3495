//! Security settings and startup probes through the real `sandpitd` over
//! the real engine, across restarts: what the agent holds (the user, the
//! capability set, the probe and its verdict) keeps working for a
//! restarted daemon, which stored none of it but the request. Root only,
//! with what `privileged.rs` needs (the harness here is its, trimmed).
#![cfg(feature = "privileged-tests")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sandpit_image::{IdShift, ImageConfig, ImageStore, Reference};
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;
use tonic::Request;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn agent() -> PathBuf {
    std::env::var_os("SANDPIT_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent")
        })
}

fn spawner() -> PathBuf {
    std::env::var_os("SANDPIT_SPAWN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("sandpit-spawn")
        })
}

/// A data dir whose store holds busybox as `busybox:latest`.
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sandpitd-sec")
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

struct Daemon {
    child: Child,
    addr: String,
}

const KEY: &str = "security-test-key";

impl Daemon {
    fn start(data: &Path) -> Self {
        // Loopback-only sandboxes: these daemons run side by side (and next
        // to the networking tests' own), and one network layout per host
        // is all a host takes.
        let config = data.join("sandpitd.toml");
        std::fs::write(&config, "[network]\nenabled = false\n").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandpitd"))
            .args(["--listen", "127.0.0.1:0", "--api-key", KEY, "--data-dir"])
            .arg(data)
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

    fn kill9(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    r
}

fn create(script: &str, f: impl FnOnce(&mut pb::SandboxSpec)) -> pb::CreateSandboxRequest {
    let mut spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: "busybox".into(),
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    f(&mut spec);
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn status(c: &mut SandboxServiceClient<Channel>, id: &str) -> pb::SandboxStatus {
    c.get_sandbox(authed(pb::GetSandboxRequest {
        sandbox_id: id.into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

async fn wait_for(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    want: pb::State,
    within: Duration,
) -> pb::SandboxStatus {
    let deadline = Instant::now() + within;
    loop {
        let st = status(c, id).await;
        if st.state() == want {
            return st;
        }
        assert!(Instant::now() < deadline, "{id}: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(c: &mut SandboxServiceClient<Channel>, id: &str, script: &str) -> String {
    let r = c
        .exec(authed(pb::ExecRequest {
            sandbox_id: id.into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_capabilities_and_probes_survive_a_kill_9() {
    let data = data_dir();
    let d = Daemon::start(data.path());
    let mut c = d.client().await;

    let secure = c
        .create_sandbox(authed(create("sleep 1000", |s| {
            s.containers[0].security_context = Some(pb::SecurityContext {
                run_as_user: Some(1000),
                capabilities_drop: vec!["ALL".into()],
                ..Default::default()
            });
        })))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secure.status.unwrap().state(), pb::State::Running);
    let secure = secure.sandbox_id;
    let who = "id -u; id -g; grep CapBnd /proc/self/status";
    let before = run(&mut c, &secure, who).await;
    assert_eq!(before, "1000\n1000\nCapBnd:\t0000000000000000\n");

    // Passes once the main command made the file (about 3 s in): the
    // daemon is killed while it is still CREATING.
    let probed = c
        .create_sandbox(authed(create(
            "sleep 3; touch /tmp/ready; exec sleep 1000",
            |s| {
                s.containers[0].startup_probe = Some(pb::Probe {
                    exec: vec!["test".into(), "-e".into(), "/tmp/ready".into()],
                    period_seconds: 1,
                    failure_threshold: 60,
                    ..Default::default()
                });
            },
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probed.status.unwrap().state(), pb::State::Creating);
    let probed = probed.sandbox_id;
    d.kill9();

    let d = Daemon::start(data.path());
    let mut c = d.client().await;
    // The agent kept the user and the set: execs are as before.
    assert_eq!(run(&mut c, &secure, who).await, before);
    // And the probe: RUNNING once it passes, not before.
    let st = status(&mut c, &probed).await;
    assert!(
        matches!(st.state(), pb::State::Creating | pb::State::Running),
        "{st:?}"
    );
    let st = wait_for(&mut c, &probed, pb::State::Running, Duration::from_secs(30)).await;
    assert!(st.start_time.is_some());
    assert_eq!(run(&mut c, &probed, "ls /tmp/ready").await, "/tmp/ready\n");
    // Sandboxes outlive daemons: stop them, and nothing is left.
    for id in [&secure, &probed] {
        let st = c
            .delete_sandbox(authed(pb::DeleteSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap()
            .status
            .unwrap();
        assert_eq!(st.state(), pb::State::Terminated);
        assert!(!data.path().join("sandboxes").join(id).exists(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_never_passes_leaves_nothing_behind() {
    let data = data_dir();
    let d = Daemon::start(data.path());
    let mut c = d.client().await;
    let sb = c
        .create_sandbox(authed(create(
            "echo starting; python3 -m http.server 8080 || sleep 1000",
            |s| {
                s.annotations.insert(
                    "sandpit.dev/startup-probe".into(),
                    r#"{"tcp": {"port": 8080}, "period_seconds": 1, "failure_threshold": 2}"#
                        .into(),
                );
            },
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sb.status.unwrap().state(), pb::State::Creating);
    let id = sb.sandbox_id;
    let st = wait_for(&mut c, &id, pb::State::Failed, Duration::from_secs(30)).await;
    assert_eq!(
        st.state_reason,
        "startup probe failed: 2 consecutive checks failed; last: tcp connect \
         127.0.0.1:8080: connection refused"
    );
    // Nothing of it is left on the host.
    assert!(!data.path().join("sandboxes").join(&id).exists());
    let cgroups = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!cgroups.contains(&id), "a mount of {id} is left");
    // Its output was kept.
    let mut logs = c
        .stream_logs(authed(pb::StreamLogsRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(entry) = logs.message().await.unwrap() {
        text.extend_from_slice(&entry.data);
    }
    assert!(
        String::from_utf8_lossy(&text).starts_with("starting\n"),
        "{}",
        String::from_utf8_lossy(&text)
    );
}
