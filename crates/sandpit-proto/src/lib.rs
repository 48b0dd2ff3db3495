//! The `coreweave.sandbox.v1` gRPC protocol of the `cwsandbox` client,
//! compiled from `proto/` with tonic (messages, clients and servers).
//!
//! The definitions mirror the descriptors shipped in `cwsandbox` 1.22.0; the
//! drift test in `tests/compat` keeps them identical (see `proto/README.md`).
//!
//! Every generated server trait has default method bodies that answer
//! `UNIMPLEMENTED`, so a server overrides only the RPCs it supports.
//! Server-streaming methods therefore return a boxed stream,
//! `tonic::codegen::BoxStream<T>`, rather than an associated stream type.
//!
//! Paths: `sandpit_proto::coreweave::sandbox::v1` (the package path), also
//! reachable as `sandpit_proto::sandbox::v1`.
//!
//! ```
//! use sandpit_proto::coreweave::sandbox::v1::{GetSandboxRequest, sandbox_service_server};
//! let req = GetSandboxRequest { sandbox_id: "sb-1".into() };
//! assert_eq!(req.sandbox_id, "sb-1");
//! assert_eq!(
//!     sandbox_service_server::SERVICE_NAME,
//!     "coreweave.sandbox.v1.SandboxService"
//! );
//! ```

#![forbid(unsafe_code)]

/// Generated code, one module per protobuf package.
pub mod coreweave {
    /// `coreweave.sandbox.*`
    pub mod sandbox {
        /// `coreweave.sandbox.v1`: SandboxService, SandboxDataPlaneService,
        /// DiscoveryService, SandboxTemplateService, SettingsService and
        /// VolumeService, with their messages.
        #[allow(
            clippy::all,
            clippy::pedantic,
            missing_debug_implementations,
            missing_docs,
            rustdoc::all
        )]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/coreweave.sandbox.v1.rs"));
        }
    }
}

pub use coreweave::sandbox;

/// Sandpit's own extensions, next to `coreweave.sandbox.v1` (not part of the
/// client's protocol; see `proto/sandpit/`).
pub mod sandpit {
    /// `sandpit.v1`: CheckpointService (commit a sandbox into an image) and
    /// Operations (live sandbox stats) and Accounting (per-command records).
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations,
        missing_docs,
        rustdoc::all
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/sandpit.v1.rs"));
    }
}

/// The encoded `FileDescriptorSet` of every file under `proto/` plus the
/// well-known types they import, for `tonic-reflection`
/// (`register_encoded_file_descriptor_set`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sandpit_descriptor.bin"));

/// The protobuf package all definitions live in.
pub const PACKAGE: &str = "coreweave.sandbox.v1";

#[cfg(test)]
mod tests {
    use super::sandbox::v1::{
        exec_stream_output, exec_stream_request, ExecStreamInit, ExecStreamOutput,
        ExecStreamRequest, SandboxStatus, State,
    };
    use super::{FILE_DESCRIPTOR_SET, PACKAGE};
    use prost::Message;

    #[test]
    fn exec_stream_request_roundtrip() {
        let req = ExecStreamRequest {
            message: Some(exec_stream_request::Message::Init(ExecStreamInit {
                sandbox_id: "sb-1".into(),
                command: vec!["echo".into(), "hi".into()],
                tty: true,
                tty_width: 80,
                tty_height: 24,
                ..Default::default()
            })),
        };
        let bytes = req.encode_to_vec();
        // Field 1 (init), wire type 2 (length-delimited).
        assert_eq!(bytes[0], (1 << 3) | 2);
        assert_eq!(ExecStreamRequest::decode(bytes.as_slice()).unwrap(), req);
    }

    #[test]
    fn known_wire_bytes_decode() {
        // stream = STDERR (field 1, varint 2), data = "x" (field 2, bytes).
        let out = ExecStreamOutput::decode(&[0x08, 0x02, 0x12, 0x01, b'x'][..]).unwrap();
        assert_eq!(out.stream(), exec_stream_output::Stream::Stderr);
        assert_eq!(out.data, b"x");
    }

    #[test]
    fn proto3_optional_exit_code_is_tracked() {
        let unset = SandboxStatus {
            state: State::Completed.into(),
            ..Default::default()
        };
        let zero = SandboxStatus {
            exit_code: Some(0),
            ..unset.clone()
        };
        // An explicit 0 is on the wire; an unset one is not.
        assert!(zero.encoded_len() > unset.encoded_len());
        assert_eq!(
            SandboxStatus::decode(zero.encode_to_vec().as_slice())
                .unwrap()
                .exit_code,
            Some(0)
        );
    }

    #[test]
    fn descriptor_set_contains_the_package() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let ours: Vec<_> = set.file.iter().filter(|f| f.package() == PACKAGE).collect();
        let names: Vec<_> = ours.iter().map(|f| f.name()).collect();
        assert!(
            names.contains(&"coreweave/sandbox/v1/sandbox.proto"),
            "{names:?}"
        );
        let services: Vec<_> = ours
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        for svc in [
            "SandboxService",
            "DiscoveryService",
            "SandboxDataPlaneService",
        ] {
            assert!(services.contains(&svc), "{svc} missing from {services:?}");
        }
        // The extension service is in the same set (reflection lists it).
        assert!(set.file.iter().any(|f| f.package() == "sandpit.v1"
            && f.service.iter().any(|s| s.name() == "CheckpointService")));
        assert_eq!(
            super::sandpit::v1::checkpoint_service_server::SERVICE_NAME,
            "sandpit.v1.CheckpointService"
        );
        assert_eq!(
            super::sandpit::v1::operations_server::SERVICE_NAME,
            "sandpit.v1.Operations"
        );
        // Imports are included, so reflection can resolve google.protobuf.Timestamp.
        assert!(set
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"));
    }
}
