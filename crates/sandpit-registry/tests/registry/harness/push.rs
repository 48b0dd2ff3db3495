//! Pushing test images over the distribution API (and with `skopeo`).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;

use super::*;

/// Pushes blobs and manifests over the distribution API.
pub(crate) struct Pusher {
    pub(crate) base: String,
    pub(crate) auth: Option<String>,
    pub(crate) cert: Option<Vec<u8>>,
}

impl Pusher {
    pub(crate) fn agent(&self) -> ureq::Agent {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &self.cert {
            let cert = ureq::tls::Certificate::from_pem(pem).unwrap();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])));
        }
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .tls_config(tls.build())
                .build(),
        )
    }

    pub(crate) fn with_auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        }
    }

    pub(crate) fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let agent = self.agent();
        let resp = self
            .with_auth(agent.post(format!("{}/v2/{repo}/blobs/uploads/", self.base)))
            .send_empty()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "start upload");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .with_auth(agent.put(format!("{location}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "finish upload of {digest}");
        digest
    }

    pub(crate) fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        data: &[u8],
    ) -> String {
        let resp = self
            .with_auth(
                self.agent()
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
            )
            .header("Content-Type", media_type)
            .send(data)
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "push manifest {repo}:{reference}: {body}");
        sha256(data)
    }

    /// Pushes an image; returns its manifest digest.
    pub(crate) fn image(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        for layer in &image.layers {
            self.blob(repo, &layer.blob);
        }
        self.blob(repo, &image.config);
        self.manifest(repo, tag, image.manifest_type(), &image.manifest())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Comp {
    None,
    Gzip,
    Zstd,
}

#[derive(Clone)]
pub(crate) struct TestLayer {
    pub(crate) blob: Vec<u8>,
    pub(crate) comp: Comp,
    pub(crate) diff_id: String,
}

impl TestLayer {
    pub(crate) fn new(tar: &[u8], comp: Comp) -> Self {
        let blob = match comp {
            Comp::None => tar.to_vec(),
            Comp::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                gz.write_all(tar).unwrap();
                gz.finish().unwrap()
            }
            Comp::Zstd => zstd::stream::encode_all(tar, 19).unwrap(),
        };
        Self {
            blob,
            comp,
            diff_id: sha256(tar),
        }
    }

    pub(crate) fn digest(&self) -> String {
        sha256(&self.blob)
    }

    pub(crate) fn media_type(&self, oci: bool) -> String {
        let base = if oci {
            "application/vnd.oci.image.layer.v1.tar"
        } else {
            "application/vnd.docker.image.rootfs.diff.tar"
        };
        match (self.comp, oci) {
            (Comp::None, _) => base.to_owned(),
            (Comp::Gzip, true) => format!("{base}+gzip"),
            (Comp::Gzip, false) => format!("{base}.gzip"),
            (Comp::Zstd, true) => format!("{base}+zstd"),
            (Comp::Zstd, false) => format!("{base}.zstd"),
        }
    }
}

pub(crate) struct TestImage {
    pub(crate) layers: Vec<TestLayer>,
    pub(crate) config: Vec<u8>,
    pub(crate) oci: bool,
    /// Overrides the layers' media types in the manifest.
    pub(crate) media_types: Option<Vec<String>>,
}

impl TestImage {
    pub(crate) fn new(layers: Vec<TestLayer>, oci: bool) -> Self {
        Self::with_arch(layers, oci, "amd64")
    }

    pub(crate) fn with_arch(layers: Vec<TestLayer>, oci: bool, arch: &str) -> Self {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
                "Entrypoint": ["/bin/sh"],
                "Cmd": ["-c", "echo hi"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        Self {
            layers,
            config,
            oci,
            media_types: None,
        }
    }

    pub(crate) fn manifest_type(&self) -> &'static str {
        if self.oci {
            OCI_MANIFEST
        } else {
            DOCKER_MANIFEST
        }
    }

    pub(crate) fn manifest(&self) -> Vec<u8> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let media_type = match &self.media_types {
                    Some(types) => types[i].clone(),
                    None => l.media_type(self.oci),
                };
                let mut d =
                    json!({"mediaType": media_type, "digest": l.digest(), "size": l.blob.len()});
                if media_type.contains("foreign") {
                    d["urls"] = json!(["https://layers.example.invalid/blob"]);
                }
                d
            })
            .collect();
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": self.manifest_type(),
            "config": {
                "mediaType": if self.oci { OCI_CONFIG } else { DOCKER_CONFIG },
                "digest": sha256(&self.config),
                "size": self.config.len(),
            },
            "layers": layers,
        }))
        .unwrap()
    }
}

pub(crate) fn skopeo_push(rootfs: &Path, destination: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("tarball:{}", rootfs.display()))
        .arg(format!("docker://{destination}"))
        .output()
        .expect("skopeo is installed");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn push_multi_arch(
    pusher: &Pusher,
    repo: &str,
    tag: &str,
    arches: &[(&str, Option<&str>)],
) -> Vec<TestLayer> {
    let mut entries = Vec::new();
    let mut layers = Vec::new();
    for (arch, variant) in arches {
        let layer = TestLayer::new(
            &TarBuilder::new().file("arch", arch.as_bytes()).finish(),
            Comp::Gzip,
        );
        let image = TestImage::with_arch(vec![layer.clone()], true, arch);
        let digest = pusher.image(repo, &format!("{tag}-{arch}"), &image);
        let mut platform = json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": image.manifest().len(),
            "platform": platform,
        }));
        layers.push(layer);
    }
    // An attestation manifest, as BuildKit writes them.
    let att = TestLayer::new(&TarBuilder::new().file("att", b"att").finish(), Comp::None);
    let att_image = TestImage::with_arch(vec![att], true, "amd64");
    let att_digest = pusher.image(repo, &format!("{tag}-att"), &att_image);
    entries.insert(
        0,
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": att_digest,
            "size": att_image.manifest().len(),
            "platform": {"os": "unknown", "architecture": "unknown"},
        }),
    );
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    pusher.manifest(repo, tag, OCI_INDEX, &index);
    layers
}
