//! A `docker-registry serve` on loopback.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::*;

#[derive(Default)]
pub(crate) struct RegistryOptions {
    pub(crate) htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a fresh self-signed certificate for 127.0.0.1.
    pub(crate) tls: bool,
}

/// A `docker-registry serve` on a loopback port, killed on drop.
pub(crate) struct Registry {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) user: Option<(String, String)>,
    /// PEM of the certificate when serving HTTPS.
    pub(crate) cert: Option<PathBuf>,
}

impl Registry {
    pub(crate) fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    /// A registry on a free port. The port is picked, released, then bound
    /// by `docker-registry`: another test's listener can take it in between
    /// (and answer the readiness check in its place), so the start counts
    /// only once the registry itself says it listens, and is retried on a
    /// new port if it exited.
    pub(crate) fn start_with(options: RegistryOptions) -> Self {
        for _ in 0..5 {
            if let Some(registry) = Self::try_start(&options) {
                return registry;
            }
        }
        panic!("docker-registry did not start on any of 5 ports");
    }

    fn try_start(options: &RegistryOptions) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cert_path = None;
        let mut tls = String::new();
        if options.tls {
            let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
            let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            fs::write(&cert_file, cert.cert.pem()).unwrap();
            fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
            tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_file.display(),
                key_file.display()
            );
            cert_path = Some(cert_file);
        }
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n  secret: sandpit-test\n{tls}\
             validation:\n  manifests:\n    urls:\n      allow:\n        - ^https://\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = &options.htpasswd {
            let hash = bcrypt::hash_with_result(password, 5)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            let path = dir.path().join("htpasswd");
            fs::write(&path, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: sandpit-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed");
        let mut registry = Self {
            child,
            addr,
            dir,
            user: options.htpasswd.clone(),
            cert: cert_path,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if registry.child.try_wait().unwrap().is_some() {
                eprintln!("docker-registry exited: {}", registry.log());
                return None;
            }
            if registry.log().contains("listening on") {
                wait_for_port(&registry.addr);
                return Some(registry);
            }
            assert!(Instant::now() < deadline, "{} did not start", registry.addr);
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pusher(&self) -> Pusher {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        Pusher {
            base: format!("{scheme}://{}", self.addr),
            cert: self.cert.as_ref().map(|p| fs::read(p).unwrap()),
            auth: self.user.as_ref().map(|(u, p)| {
                use base64::Engine;
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
        }
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
