use sandpit_proto::sandbox::v1 as pb;
use sandpit_runtime::{capability_by_name, capability_mask, DEFAULT_CAPS};

use crate::api::validate::test_support::{spec, validate, violations};
use crate::model::Security;

const P: &str = "sandbox.spec.containers[0].security_context";

fn with(sc: pb::SecurityContext) -> pb::SandboxSpec {
    spec(|s| s.containers[0].security_context = Some(sc))
}

fn security(sc: pb::SecurityContext) -> Security {
    validate(with(sc)).expect("accepted").security
}

fn caps(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn default_without(names: &[&str]) -> u64 {
    let drop: Vec<u32> = names
        .iter()
        .map(|n| capability_by_name(n).unwrap())
        .collect();
    let keep: Vec<u32> = DEFAULT_CAPS
        .iter()
        .copied()
        .filter(|c| !drop.contains(c))
        .collect();
    capability_mask(&keep)
}

#[test]
fn no_context_and_the_defaults_spelled_out_are_the_default() {
    assert_eq!(
        validate(spec(|_| {})).unwrap().security,
        Security::default()
    );
    let s = security(pb::SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(false),
        seccomp_profile: "RuntimeDefault".into(),
        // Re-adding what the default set holds anyway changes nothing.
        capabilities_add: caps(&["CHOWN", "cap_kill"]),
        ..Default::default()
    });
    assert_eq!(s, Security::default());
    for profile in ["", "runtime/default"] {
        let s = security(pb::SecurityContext {
            seccomp_profile: profile.into(),
            ..Default::default()
        });
        assert_eq!(s, Security::default());
    }
}

#[test]
fn users_groups_and_a_read_only_root_are_taken() {
    let s = security(pb::SecurityContext {
        run_as_user: Some(1000),
        run_as_group: Some(0),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    });
    assert_eq!(
        s,
        Security {
            run_as_user: Some(1000),
            run_as_group: Some(0),
            capabilities: None,
            read_only_root: true,
        }
    );
    // The highest mapped id is fine, one more is not.
    let s = security(pb::SecurityContext {
        run_as_user: Some(65535),
        ..Default::default()
    });
    assert_eq!(s.run_as_user, Some(65535));
    assert_eq!(
        violations(with(pb::SecurityContext {
            run_as_user: Some(65536),
            run_as_group: Some(u32::MAX),
            ..Default::default()
        })),
        [
            (
                format!("{P}.run_as_user"),
                "uid 65536 is outside the sandbox's user namespace (0-65535)".into()
            ),
            (
                format!("{P}.run_as_group"),
                "gid 4294967295 is outside the sandbox's user namespace (0-65535)".into()
            ),
        ]
    );
}

#[test]
fn capabilities_follow_dockers_rules() {
    let drop = |d: &[&str], a: &[&str]| {
        security(pb::SecurityContext {
            capabilities_drop: caps(d),
            capabilities_add: caps(a),
            ..Default::default()
        })
        .capabilities
    };
    assert_eq!(drop(&["NET_RAW"], &[]), Some(default_without(&["NET_RAW"])));
    // Spelled with or without CAP_, in any case.
    assert_eq!(
        drop(&["CAP_NET_RAW", "mknod"], &[]),
        Some(default_without(&["NET_RAW", "MKNOD"]))
    );
    // A drop wins over an add of the same capability.
    assert_eq!(
        drop(&["NET_RAW"], &["NET_RAW"]),
        Some(default_without(&["NET_RAW"]))
    );
    // ALL empties the set; adds then build it up again.
    assert_eq!(drop(&["ALL"], &[]), Some(0));
    let chown = capability_by_name("CHOWN").unwrap();
    let bind = capability_by_name("NET_BIND_SERVICE").unwrap();
    assert_eq!(
        drop(&["all"], &["CHOWN", "NET_BIND_SERVICE"]),
        Some(capability_mask(&[chown, bind]))
    );
    // Dropping one the default set lacks is harmless.
    assert_eq!(drop(&["SYS_ADMIN"], &[]), None);
}

#[test]
fn capabilities_beyond_the_default_set_are_refused_by_name() {
    let v = violations(with(pb::SecurityContext {
        capabilities_add: caps(&["CHOWN", "SYS_ADMIN", "ALL", "BOGUS"]),
        capabilities_drop: caps(&["NOPE", ""]),
        ..Default::default()
    }));
    let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            format!("{P}.capabilities_drop[0]"),
            format!("{P}.capabilities_drop[1]"),
            format!("{P}.capabilities_add[1]"),
            format!("{P}.capabilities_add[2]"),
            format!("{P}.capabilities_add[3]"),
        ]
    );
    assert_eq!(v[0].1, "unknown capability \"NOPE\"");
    assert_eq!(v[1].1, "unknown capability \"\"");
    assert_eq!(
        v[2].1,
        "SYS_ADMIN is not offered: only capabilities of the default set may be added \
         (AUDIT_WRITE, CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, MKNOD, NET_BIND_SERVICE, \
         NET_RAW, SETFCAP, SETGID, SETPCAP, SETUID, SYS_CHROOT)"
    );
    assert!(v[3].1.starts_with("ALL is not offered: "), "{}", v[3].1);
    assert_eq!(v[4].1, "unknown capability \"BOGUS\"");
}

#[test]
fn privilege_and_unconfined_settings_are_refused_with_the_reason() {
    let v = violations(with(pb::SecurityContext {
        privileged: Some(true),
        allow_privilege_escalation: Some(true),
        seccomp_profile: "Unconfined".into(),
        ..Default::default()
    }));
    assert_eq!(
        v,
        [
            (
                format!("{P}.privileged"),
                "privileged sandboxes are not offered: untrusted code never gets the host's \
                 devices or capabilities beyond the default set"
                    .into()
            ),
            (
                format!("{P}.allow_privilege_escalation"),
                "privilege escalation is not offered: no_new_privs is always set, so setuid \
                 programs and file capabilities grant nothing"
                    .into()
            ),
            (
                format!("{P}.seccomp_profile"),
                "Unconfined is not offered: every sandbox runs under the default seccomp filter"
                    .into()
            ),
        ]
    );
    let v = violations(with(pb::SecurityContext {
        seccomp_profile: "Localhost/my.json".into(),
        ..Default::default()
    }));
    assert_eq!(
        v[0].1,
        "unknown seccomp profile \"Localhost/my.json\"; only RuntimeDefault is offered"
    );
}

#[test]
fn a_read_only_root_takes_mounted_files_under_tmp_only() {
    let files = |paths: &[&str]| {
        spec(|s| {
            s.containers[0].security_context = Some(pb::SecurityContext {
                read_only_root_filesystem: Some(true),
                ..Default::default()
            });
            s.containers[0].files = paths
                .iter()
                .map(|p| pb::FileMount {
                    path: p.to_string(),
                    content: b"x".to_vec(),
                })
                .collect();
        })
    };
    assert!(validate(files(&["/tmp/a", "/tmp/dir/b"])).is_ok());
    assert_eq!(
        violations(files(&["/tmp/a", "/etc/app.conf", "/tmp"])),
        [
            (
                "sandbox.spec.containers[0].files[1].path".to_string(),
                "the root file system is read-only (read_only_root_filesystem): mounted files \
                 must be under /tmp/"
                    .to_string()
            ),
            (
                "sandbox.spec.containers[0].files[2].path".to_string(),
                "the root file system is read-only (read_only_root_filesystem): mounted files \
                 must be under /tmp/"
                    .to_string()
            ),
        ]
    );
}
