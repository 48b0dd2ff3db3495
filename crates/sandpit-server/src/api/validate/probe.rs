//! `startup_probe`: a check that gates RUNNING, with Kubernetes' timing.
//!
//! The protocol's `Probe` has only `exec`. TCP and HTTP probes are a
//! Sandpit extension, given as JSON in the sandbox annotation
//! [`PROBE_ANNOTATION`] (annotations pass unchanged through every client):
//! `{"tcp": {"port": 8080}}`, `{"http": {"port": 8080, "path": "/healthz"}}`
//! or `{"exec": ["test", "-e", "/ready"]}`, with the same timing fields as
//! the protocol's (`initial_delay_seconds`, `period_seconds`,
//! `timeout_seconds`, `failure_threshold`). Unknown members are refused.

use sandpit_proto::sandbox::v1 as pb;
use sandpit_wire::{Probe, ProbeCheck};
use serde::Deserialize;

use super::{Rejection, MAX_ARGV_BYTES};

/// The annotation that carries a TCP, HTTP (or exec) probe as JSON.
pub const PROBE_ANNOTATION: &str = "sandpit.dev/startup-probe";

/// Longest initial delay, period or timeout, in seconds. The wait is bounded
/// by the sandbox's lifetime as well.
pub(super) const MAX_PROBE_SECONDS: i64 = 3600;
/// Most consecutive failures a probe may allow.
pub(super) const MAX_FAILURE_THRESHOLD: i64 = 10_000;
/// Longest HTTP probe path.
const MAX_HTTP_PATH: usize = 2048;

/// The timing fields, as given (0 = Kubernetes' default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Annotation {
    exec: Option<Vec<String>>,
    tcp: Option<Tcp>,
    http: Option<Http>,
    #[serde(default)]
    initial_delay_seconds: i64,
    #[serde(default)]
    period_seconds: i64,
    #[serde(default)]
    timeout_seconds: i64,
    #[serde(default)]
    failure_threshold: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tcp {
    port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Http {
    port: i64,
    path: Option<String>,
}

/// Reports problems of one probe, under one field path: the protocol's
/// fields are paths of their own, the annotation's are members named in the
/// description.
struct Report<'a> {
    rej: &'a mut Rejection,
    field: String,
    /// The annotation: members are named in descriptions, not paths.
    json: bool,
    before: usize,
}

impl Report<'_> {
    fn invalid(&mut self, member: &str, why: String) {
        if self.json {
            self.rej
                .invalid(self.field.clone(), format!("{member}: {why}"));
        } else {
            self.rej.invalid(format!("{}.{member}", self.field), why);
        }
    }

    fn ok(&self) -> bool {
        self.rej.invalid.len() == self.before
    }

    /// Seconds within `1..=max` as milliseconds, `default` for 0.
    fn seconds(&mut self, member: &str, v: i64, default: u32, min: i64) -> u32 {
        match v {
            0 => default * 1000,
            v if v < min => {
                self.invalid(member, format!("{v} is below {min}"));
                0
            }
            v if v > MAX_PROBE_SECONDS => {
                self.invalid(member, format!("{v} is above {MAX_PROBE_SECONDS} s"));
                0
            }
            v => v as u32 * 1000,
        }
    }

    fn port(&mut self, member: &str, v: i64) -> u16 {
        match u16::try_from(v) {
            Ok(p) if p > 0 => p,
            _ => {
                self.invalid(member, format!("{v} is not a port (1-65535)"));
                0
            }
        }
    }

    fn exec(&mut self, member: &str, argv: &[String]) -> ProbeCheck {
        if argv.first().is_none_or(String::is_empty) {
            self.invalid(member, "a command is required".into());
        }
        if argv.iter().any(|a| a.contains('\0')) {
            self.invalid(member, "contains a NUL byte".into());
        }
        if argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
            self.invalid(member, format!("longer than {MAX_ARGV_BYTES} bytes"));
        }
        ProbeCheck::Exec(argv.to_vec())
    }

    /// Kubernetes' timing: delay 0, period 10 s, timeout 1 s, threshold 3.
    fn finish(
        mut self,
        check: ProbeCheck,
        delay: i64,
        period: i64,
        timeout: i64,
        threshold: i64,
    ) -> Option<Probe> {
        let initial_delay_ms = if delay < 0 {
            self.invalid("initial_delay_seconds", format!("{delay} is negative"));
            0
        } else {
            self.seconds("initial_delay_seconds", delay, 0, 0)
        };
        let period_ms = self.seconds("period_seconds", period, 10, 1);
        let timeout_ms = self.seconds("timeout_seconds", timeout, 1, 1);
        let failure_threshold = match threshold {
            0 => 3,
            t if (1..=MAX_FAILURE_THRESHOLD).contains(&t) => t as u32,
            t => {
                self.invalid(
                    "failure_threshold",
                    format!("{t} is not within 1-{MAX_FAILURE_THRESHOLD}"),
                );
                0
            }
        };
        self.ok().then_some(Probe {
            check,
            initial_delay_ms,
            period_ms,
            timeout_ms,
            failure_threshold,
        })
    }
}

fn from_proto(rej: &mut Rejection, probe: &pb::Probe, field: String) -> Option<Probe> {
    let before = rej.invalid.len();
    let mut r = Report {
        rej,
        field,
        json: false,
        before,
    };
    if probe.exec.is_empty() {
        r.invalid(
            "exec",
            format!(
                "required: exec is the protocol's only probe; TCP and HTTP probes go in \
                 the {PROBE_ANNOTATION} annotation"
            ),
        );
    }
    let check = r.exec("exec", &probe.exec);
    r.finish(
        check,
        probe.initial_delay_seconds.into(),
        probe.period_seconds.into(),
        probe.timeout_seconds.into(),
        probe.failure_threshold.into(),
    )
}

fn from_annotation(rej: &mut Rejection, json: &str, field: String) -> Option<Probe> {
    let a: Annotation = match serde_json::from_str(json) {
        Ok(a) => a,
        Err(e) => {
            rej.invalid(field, format!("not a probe: {e}"));
            return None;
        }
    };
    let before = rej.invalid.len();
    let mut r = Report {
        rej,
        field,
        json: true,
        before,
    };
    let check = match (&a.exec, &a.tcp, &a.http) {
        (Some(argv), None, None) => r.exec("exec", argv),
        (None, Some(tcp), None) => ProbeCheck::Tcp {
            port: r.port("tcp.port", tcp.port),
        },
        (None, None, Some(http)) => {
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                r.invalid("http.path", format!("{path:?} does not start with '/'"));
            } else if path.len() > MAX_HTTP_PATH {
                r.invalid("http.path", format!("longer than {MAX_HTTP_PATH} bytes"));
            } else if !path.bytes().all(|b| b.is_ascii_graphic()) {
                // It goes into the request line verbatim.
                r.invalid(
                    "http.path",
                    "only printable ASCII without spaces (percent-encode the rest)".into(),
                );
            }
            ProbeCheck::Http {
                port: r.port("http.port", http.port),
                path,
            }
        }
        _ => {
            r.invalid("exec, tcp, http", "exactly one of them is required".into());
            return None;
        }
    };
    r.finish(
        check,
        a.initial_delay_seconds,
        a.period_seconds,
        a.timeout_seconds,
        a.failure_threshold,
    )
}

/// The sandbox's startup probe: the first container's `startup_probe`, or
/// the [`PROBE_ANNOTATION`] annotation; not both.
pub(super) fn check(rej: &mut Rejection, spec: &pb::SandboxSpec) -> Option<Probe> {
    let proto = spec
        .containers
        .first()
        .and_then(|c| c.startup_probe.as_ref());
    let annotation = spec.annotations.get(PROBE_ANNOTATION);
    let annotation_field = format!("sandbox.spec.annotations[{PROBE_ANNOTATION:?}]");
    match (proto, annotation) {
        (None, None) => None,
        (Some(p), None) => from_proto(rej, p, "sandbox.spec.containers[0].startup_probe".into()),
        (None, Some(json)) => from_annotation(rej, json, annotation_field),
        (Some(_), Some(_)) => {
            rej.invalid(
                annotation_field,
                "the container's startup_probe is set too: give the probe once",
            );
            None
        }
    }
}

#[cfg(test)]
#[path = "probe_tests.rs"]
mod tests;
