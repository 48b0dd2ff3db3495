"""Issue 13, items 9 and 10: `security_context` and startup probes, through the real clients.

Security settings go through `Sandbox.run(security_context=...)`, as users give them (once
as `cwsandbox`, once as `wandb.sandbox`: the `sdk` fixture). Startup probes: the protocol's
`Probe` (exec only) has no client API, so `startup_probe` is set on the CreateSandbox
request the client itself built, with its own protobuf types (`probe_on_create`); TCP and
HTTP probes (and exec ones) are Sandpit's `sandpit.dev/startup-probe` annotation, which
passes through `annotations=` of both clients unchanged.

The session's leak check (conftest.py) then finds no process, mount or cgroup of any of
these sandboxes, the failed ones included.
"""

from __future__ import annotations

import json
import time

import pytest

import cwsandbox
from cwsandbox import SecurityContext
from cwsandbox._proto import sandbox_pb2
from cwsandbox.exceptions import CWSandboxValidationError

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 60  # seconds: bound on any single client operation's .result()
PROBE_ANNOTATION = "sandpit.dev/startup-probe"
FIELD = "sandbox.spec.containers[0].security_context"

# CapEff bit 13 is CAP_NET_RAW, bit 0 CAP_CHOWN; Docker's default set is 0xa80425fb.
DEFAULT_CAPS = 0xA80425FB
NET_RAW = 1 << 13


def run(sb, *argv: str):
    return sb.exec(list(argv), check=False).result(timeout=RPC)


def sh(sb, script: str):
    return run(sb, "sh", "-c", script)


def cap_eff(sb) -> int:
    out = sh(sb, "grep '^CapEff:' /proc/self/status").stdout
    return int(out.split()[1], 16)


@pytest.fixture
def started(sdk, tag):
    """Runs sandboxes that are stopped after the test: `started(**run_kwargs)`."""
    boxes = []

    def start(*args, **kwargs):
        sb = sdk.Sandbox.run(*args, tags=[tag], **kwargs)
        boxes.append(sb)
        return sb

    yield start
    for sb in boxes:
        sb.stop(missing_ok=True).result(timeout=RPC)


# --------------------------------------------------------------------------- users


def test_run_as_user_runs_every_process_and_owns_written_files(started):
    sb = started(
        "sh",
        "-c",
        "id -u > /tmp/main-uid; exec sleep infinity",
        security_context=SecurityContext(run_as_user=1000, run_as_group=1000),
    )
    sb.wait(timeout=RPC)
    r = sh(sb, "id -u; id -g; echo $HOME")
    assert (r.stdout, r.returncode) == ("1000\n1000\n/\n", 0)
    # The main command too.
    assert sb.read_file("/tmp/main-uid").result(timeout=RPC) == b"1000\n"
    # write_file goes through the agent (root), but the file is the user's, and so
    # is the directory created for it.
    sb.write_file("/workspace/out/data.txt", b"hello").result(timeout=RPC)
    r = sh(sb, "stat -c '%u:%g %n' /workspace/out/data.txt /workspace/out /workspace")
    assert r.stdout == (
        "1000:1000 /workspace/out/data.txt\n1000:1000 /workspace/out\n0:0 /workspace\n"
    )
    # The user has its own rights only: root's files stay root's.
    r = sh(sb, "echo x > /etc/hostname")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # And no capabilities.
    assert cap_eff(sb) == 0


def test_a_uid_outside_the_user_namespace_is_refused(sdk, tag):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(tags=[tag], security_context={"run_as_user": 70000})
    (v,) = info.value.field_violations
    assert v.field == f"{FIELD}.run_as_user"
    assert v.description == "uid 70000 is outside the sandbox's user namespace (0-65535)"


# --------------------------------------------------------------------------- capabilities


def test_dropped_capabilities_are_gone(started):
    default = started()
    dropped = started(security_context=SecurityContext(capabilities_drop=["NET_RAW", "CHOWN"]))
    default.wait(timeout=RPC)
    dropped.wait(timeout=RPC)
    assert cap_eff(default) == DEFAULT_CAPS
    assert cap_eff(dropped) == DEFAULT_CAPS & ~NET_RAW & ~1
    bounding = sh(dropped, "grep '^CapBnd:' /proc/self/status").stdout.split()[1]
    assert int(bounding, 16) == DEFAULT_CAPS & ~NET_RAW & ~1
    # A raw socket fails without NET_RAW. It fails with it too: the network namespace
    # belongs to the host's user namespace, so the sandbox's NET_RAW never reaches it
    # (ping uses ICMP datagram sockets instead). CapEff above and CHOWN below are what
    # tell the drop apart.
    raw = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"
    for sb in (dropped, default):
        r = run(sb, "python", "-c", raw)
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    # What CHOWN gave root, it no longer has.
    give_away = "touch /tmp/f && chown 1000 /tmp/f"
    assert sh(default, give_away).returncode == 0
    r = sh(dropped, give_away)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr


def test_dropping_all_and_adding_back_within_the_default_set(started):
    sb = started(
        security_context={"capabilities_drop": ["ALL"], "capabilities_add": ["CAP_CHOWN"]}
    )
    sb.wait(timeout=RPC)
    assert cap_eff(sb) == 1


def test_adding_a_capability_beyond_the_default_set_is_refused(sdk, tag):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(
            tags=[tag],
            security_context=SecurityContext(capabilities_add=["NET_BIND_SERVICE", "SYS_ADMIN"]),
        )
    err = info.value
    assert isinstance(err, CWSandboxValidationError)
    assert err.reason == "CWSANDBOX_INVALID_REQUEST"
    (v,) = err.field_violations
    assert v.field == f"{FIELD}.capabilities_add[1]"
    assert v.description.startswith(
        "SYS_ADMIN is not offered: only capabilities of the default set may be added ("
    )
    assert "NET_RAW" in v.description and "SYS_ADMIN" in str(err)
    assert sdk.Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC) == []


REFUSED = [
    ("privileged", {"privileged": True}, "privileged sandboxes are not offered: "),
    (
        "allow_privilege_escalation",
        {"allow_privilege_escalation": True},
        "privilege escalation is not offered: no_new_privs is always set",
    ),
    ("seccomp_profile", {"seccomp_profile": "Unconfined"}, "Unconfined is not offered: "),
]


@pytest.mark.parametrize("field,ctx,why", REFUSED, ids=[r[0] for r in REFUSED])
def test_privilege_is_refused_naming_the_field(sdk, tag, field, ctx, why):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(tags=[tag], security_context=ctx)
    (v,) = info.value.field_violations
    assert v.field == f"{FIELD}.{field}"
    assert v.description.startswith(why), v.description
    assert sdk.Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC) == []


def test_the_defaults_spelled_out_are_accepted(started):
    sb = started(
        security_context=SecurityContext(
            privileged=False,
            allow_privilege_escalation=False,
            seccomp_profile="RuntimeDefault",
            read_only_root_filesystem=False,
        )
    )
    sb.wait(timeout=RPC)
    assert cap_eff(sb) == DEFAULT_CAPS
    status = sh(sb, "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status").stdout
    assert status.split() == ["NoNewPrivs:", "1", "Seccomp:", "2"]


# --------------------------------------------------------------------------- read-only root


def test_a_read_only_root_leaves_tmp_writable(sdk, started):
    sb = started(security_context=SecurityContext(read_only_root_filesystem=True))
    sb.wait(timeout=RPC)
    r = sh(sb, "touch /workspace/x")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    r = sh(sb, "echo t > /tmp/t && echo s > /dev/shm/s && cat /tmp/t /dev/shm/s")
    assert (r.stdout, r.returncode) == ("t\ns\n", 0)
    with pytest.raises(sdk.SandboxFileError) as info:
        sb.write_file("/etc/app.conf", b"x").result(timeout=RPC)
    assert info.value.reason == "CWSANDBOX_FILE_PERMISSION_DENIED"
    assert "read-only file system" in str(info.value)
    sb.write_file("/tmp/app.conf", b"x").result(timeout=RPC)
    assert sb.read_file("/tmp/app.conf").result(timeout=RPC) == b"x"


def test_a_read_only_root_takes_mounted_files_under_tmp_only(sdk, tag):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(
            tags=[tag],
            security_context={"read_only_root_filesystem": True},
            mounted_files=[{"mount_path": "/workspace/conf.json", "file_content": b"{}"}],
        )
    (v,) = info.value.field_violations
    assert v.field == "sandbox.spec.containers[0].files[0].path"
    assert "mounted files must be under /tmp/" in v.description


# --------------------------------------------------------------------------- startup probes


@pytest.fixture
def probe_on_create(monkeypatch):
    """`set(**Probe fields)`: the next CreateSandbox the client builds carries that probe.

    The client has no probe API; its request builder is wrapped so the request it built
    (its own protobuf types, its own serialisation) gains `containers[0].startup_probe`.
    """
    probe: list[sandbox_pb2.Probe] = []
    original = cwsandbox.Sandbox._build_create_request

    def build(self, *, request_id, start_kwargs):
        req = original(self, request_id=request_id, start_kwargs=start_kwargs)
        if probe:
            req.sandbox.spec.containers[0].startup_probe.CopyFrom(probe[0])
        return req

    monkeypatch.setattr(cwsandbox.Sandbox, "_build_create_request", build)

    def set_probe(**fields):
        probe[:] = [sandbox_pb2.Probe(**fields)]

    return set_probe


def test_an_exec_probe_gates_running_until_it_passes(started, probe_on_create):
    probe_on_create(exec=["test", "-e", "/tmp/ready"], period_seconds=1, failure_threshold=30)
    began = time.monotonic()
    sb = started("sh", "-c", "sleep 3; touch /tmp/ready; exec sleep infinity")
    # Answered before the probe decided: the client polls through CREATING.
    assert time.monotonic() - began < 2.5
    assert sb.status != cwsandbox.SandboxStatus.RUNNING
    sb.wait(timeout=RPC)
    assert time.monotonic() - began >= 2.5
    assert sb.status == cwsandbox.SandboxStatus.RUNNING
    # RUNNING means the probe passed: the file is there.
    assert run(sb, "test", "-e", "/tmp/ready").returncode == 0


def test_a_probe_that_never_passes_fails_with_its_last_output(sdk, started):
    probe = {
        "exec": ["sh", "-c", "echo not ready yet; echo no db >&2; exit 1"],
        "period_seconds": 1,
        "failure_threshold": 2,
    }
    sb = started("sleep", "infinity", annotations={PROBE_ANNOTATION: json.dumps(probe)})
    with pytest.raises(sdk.SandboxFailedError) as info:
        sb.wait(timeout=RPC)
    assert info.value.status_reason == (
        "startup probe failed: 2 consecutive checks failed; last: exec exited with code 1: "
        "not ready yet\nno db"
    )
    assert sb.status == cwsandbox.SandboxStatus.FAILED


def test_the_main_process_ending_first_fails_the_probe(sdk, started):
    probe = {"tcp": {"port": 9000}, "period_seconds": 1, "failure_threshold": 100}
    sb = started("sh", "-c", "sleep 1; exit 4", annotations={PROBE_ANNOTATION: json.dumps(probe)})
    with pytest.raises(sdk.SandboxFailedError) as info:
        sb.wait(timeout=RPC)
    assert info.value.status_reason.startswith(
        "startup probe failed: main process exited with code 4 before the probe succeeded"
    ), info.value.status_reason


@pytest.mark.parametrize(
    "check",
    [{"tcp": {"port": 8000}}, {"http": {"port": 8000, "path": "/"}}],
    ids=["tcp", "http"],
)
def test_tcp_and_http_probes_wait_for_a_server_of_the_main_command(started, check):
    probe = {**check, "period_seconds": 1, "failure_threshold": 60}
    began = time.monotonic()
    sb = started(
        "sh",
        "-c",
        "sleep 2; exec python -m http.server 8000 --bind 127.0.0.1",
        annotations={PROBE_ANNOTATION: json.dumps(probe)},
    )
    sb.wait(timeout=RPC)
    assert time.monotonic() - began >= 2
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/').status)"
    r = run(sb, "python", "-c", fetch)
    assert (r.stdout, r.returncode) == ("200\n", 0)


def test_a_bad_probe_annotation_names_the_member(sdk, tag):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(tags=[tag], annotations={PROBE_ANNOTATION: '{"tcp": {"port": 0}}'})
    (v,) = info.value.field_violations
    assert v.field == f'sandbox.spec.annotations["{PROBE_ANNOTATION}"]'
    assert v.description == "tcp.port: 0 is not a port (1-65535)"
