"""Issue 3 acceptance: the control plane through the real clients only.

Every call goes through `cwsandbox` or `wandb.sandbox` (the `sdk` fixture runs a
test once per import path; wandb.sandbox authenticates with `x-wandb-api-key`,
cwsandbox with `authorization: Bearer`). Tests that need a second principal,
no key, or a daemon restart use cwsandbox with explicit `auth=` / the `server`
fixture. Each test tags its sandboxes (`tag` fixture) and those left running
are stopped after it.
"""

from __future__ import annotations

import re
import time

import pytest

import cwsandbox
from cwsandbox import AuthHeaders, ResourceOptions, Sandbox, SandboxStatus
from cwsandbox.exceptions import (
    CWSandboxAuthenticationError,
    CWSandboxError,
    CWSandboxValidationError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
)

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 60  # seconds: bound on any single client operation's .result()


def ids(boxes) -> set[str]:
    return {b.sandbox_id for b in boxes}


def assert_reports_exit_code(sb, code: int) -> None:
    """The main process's exit code of a FAILED sandbox, as the client exposes it.

    cwsandbox sets `returncode` only for a COMPLETED sandbox observed by polling
    (`_apply_sandbox_info`: never for FAILED, never from from_id/list), so for a
    FAILED one the code can only reach the user through `status_reason` or
    `container_statuses[].exit_code`; one of them must carry it.
    """
    codes = {c.exit_code for c in sb.container_statuses if c.exit_code is not None}
    reason = sb.status_reason or ""
    assert code in codes or re.search(rf"\b{code}\b", reason), (
        f"exit code {code} neither in state_reason {reason!r} nor in container_statuses {codes}"
    )


# --------------------------------------------------------------------------- basic lifecycle


def test_run_without_command_stays_running_until_stopped(sdk, tag):
    sb = sdk.Sandbox.run(tags=[tag])
    try:
        assert sb.sandbox_id, "run() returns with the id from CreateSandbox"
        assert sb.wait(timeout=RPC) is sb
        assert sb.status == sdk.SandboxStatus.RUNNING
        assert sb.returncode is None
        time.sleep(1.0)  # the client's default main command keeps it alive
        assert sb.get_status() == sdk.SandboxStatus.RUNNING
        assert sb.started_at is not None
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)
    assert sb.status == sdk.SandboxStatus.TERMINATED


def test_main_command_exit_0_is_completed(sdk, tag):
    sb = sdk.Sandbox.run("python", "-c", "print('hi')", tags=[tag])
    assert sb.wait_until_complete(timeout=RPC).result(timeout=RPC) is sb
    assert sb.status == sdk.SandboxStatus.COMPLETED
    assert sb.returncode == 0


def test_main_command_nonzero_exit_is_failed(sdk, tag):
    sb = sdk.Sandbox.run("sh", "-c", "exit 3", tags=[tag])
    with pytest.raises(sdk.SandboxFailedError) as info:
        sb.wait_until_complete(timeout=RPC).result(timeout=RPC)
    assert info.value.sandbox_id == sb.sandbox_id
    assert sb.status == sdk.SandboxStatus.FAILED
    assert_reports_exit_code(sb, 3)


def test_bad_command_is_failed_with_a_reason(sdk, tag):
    sb = sdk.Sandbox.run("/no/such/command", "arg", tags=[tag])
    # The docs: wait() is how users "distinguish startup failures from errors in later
    # commands", so a main command that cannot start must not be reported RUNNING first.
    try:
        sb.wait(timeout=RPC)
    except sdk.SandboxFailedError as e:
        err = e
    else:
        pytest.fail(
            f"wait() returned with the sandbox {sb.status}: a main command that cannot be "
            "started must surface as FAILED from wait(), not after a RUNNING report"
        )
    assert sb.status == sdk.SandboxStatus.FAILED
    reason = err.status_reason or ""
    assert reason, "FAILED without a state_reason saying what broke"
    assert "/no/such/command" in reason or "no such file" in reason.lower(), reason


def test_wait_until_complete_times_out_on_a_running_sandbox(tag):
    sb = Sandbox.run("sleep", "infinity", tags=[tag])
    start = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sb.wait_until_complete(timeout=2).result(timeout=RPC)
    assert time.monotonic() - start < 15
    assert sb.get_status() == SandboxStatus.RUNNING


# --------------------------------------------------------------------------- stop


def test_stop_kills_after_the_grace_period(sdk, tag):
    # The main command ignores SIGTERM (and so does its child): only SIGKILL ends it.
    sb = sdk.Sandbox.run("sh", "-c", "trap '' TERM; sleep 1000", tags=[tag])
    sb.wait(timeout=RPC)
    start = time.monotonic()
    sb.stop(graceful_shutdown_seconds=2, missing_ok=True).result(timeout=RPC)
    elapsed = time.monotonic() - start
    assert sb.status == sdk.SandboxStatus.TERMINATED
    assert 1.5 <= elapsed < 15, f"stop with a 2 s grace took {elapsed:.1f}s"
    # Already stopped: missing_ok makes a second stop a no-op.
    sb.stop(graceful_shutdown_seconds=2, missing_ok=True).result(timeout=RPC)
    assert sdk.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC).status == (
        sdk.SandboxStatus.TERMINATED
    )


def test_stop_returns_early_when_the_process_honours_sigterm(sdk, tag):
    sb = sdk.Sandbox.run(tags=[tag])  # default command: `trap "exit 0" TERM`
    sb.wait(timeout=RPC)
    start = time.monotonic()
    sb.stop(graceful_shutdown_seconds=30.0, missing_ok=True).result(timeout=RPC)
    elapsed = time.monotonic() - start
    assert sb.status == sdk.SandboxStatus.TERMINATED
    assert elapsed < 10, f"stop waited {elapsed:.1f}s for a process that exits on SIGTERM"


def test_delete_by_id_missing_ok(tag):
    sb = Sandbox.run(tags=[tag])
    sb.wait(timeout=RPC)
    Sandbox.delete(sb.sandbox_id).result(timeout=RPC)
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        status = Sandbox.from_id(sb.sandbox_id).result(timeout=RPC).status
        if status == SandboxStatus.TERMINATED:
            break
        time.sleep(0.2)
    assert status == SandboxStatus.TERMINATED
    Sandbox.delete(sb.sandbox_id, missing_ok=True).result(timeout=RPC)
    with pytest.raises(SandboxNotFoundError):
        Sandbox.delete("sb-does-not-exist-0000", missing_ok=False).result(timeout=RPC)
    Sandbox.delete("sb-does-not-exist-0000", missing_ok=True).result(timeout=RPC)


# --------------------------------------------------------------------------- context managers, sessions


def test_context_manager_stops_on_exit(sdk, tag):
    with sdk.Sandbox.run(tags=[tag]) as sb:
        sb.wait(timeout=RPC)
        assert sb.status == sdk.SandboxStatus.RUNNING
    assert sb.status == sdk.SandboxStatus.TERMINATED
    again = sdk.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC)
    assert again.status == sdk.SandboxStatus.TERMINATED


def test_context_manager_stops_when_the_block_raises(sdk, tag):
    box = {}
    with pytest.raises(RuntimeError, match="boom"):
        with sdk.Sandbox.run(tags=[tag]) as sb:
            box["sb"] = sb
            sb.wait(timeout=RPC)
            raise RuntimeError("boom")
    again = sdk.Sandbox.from_id(box["sb"].sandbox_id).result(timeout=RPC)
    assert again.status == sdk.SandboxStatus.TERMINATED
    assert sdk.Sandbox.list(tags=[tag]).result(timeout=RPC) == []


def test_session_with_defaults_closes_all_its_sandboxes(sdk, tag):
    defaults = sdk.SandboxDefaults(
        container_image="python:3.11", max_lifetime_seconds=300, tags=(tag, "batch-job")
    )
    with sdk.Session(defaults) as session:
        first = session.sandbox()
        second = session.sandbox(command="sleep", args=["infinity"])
        for sb in (first, second):
            sb.start().result(timeout=RPC)
        for sb in (first, second):
            sb.wait(timeout=RPC)
        listed = sdk.Sandbox.list(tags=[tag, "batch-job"]).result(timeout=RPC)
        assert ids(listed) == {first.sandbox_id, second.sandbox_id}
        for sb in listed:
            assert {tag, "batch-job"} <= set(sb.tags)
            assert sb.status == sdk.SandboxStatus.RUNNING
        assert ids(session.list().result(timeout=RPC)) == {first.sandbox_id, second.sandbox_id}
    assert sdk.Sandbox.list(tags=[tag]).result(timeout=RPC) == []
    ended = sdk.Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC)
    assert ids(ended) == {first.sandbox_id, second.sandbox_id}
    assert {sb.status for sb in ended} == {sdk.SandboxStatus.TERMINATED}


# --------------------------------------------------------------------------- list / from_id


def test_list_filters_by_all_tags_and_show_terminated(tag):
    x = Sandbox.run(tags=[tag, "role-x"])
    y = Sandbox.run(tags=[tag, "role-y"])
    done = Sandbox.run("true", tags=[tag, "role-x"])
    done.wait_until_complete(timeout=RPC).result(timeout=RPC)
    x.wait(timeout=RPC)
    y.wait(timeout=RPC)

    def listed(*tags, **kw):
        return ids(Sandbox.list(tags=list(tags), **kw).result(timeout=RPC))

    assert listed(tag) == {x.sandbox_id, y.sandbox_id}
    assert listed(tag, "role-x") == {x.sandbox_id}
    assert listed(tag, "role-x", "role-y") == set()
    assert listed(tag, "no-such-tag") == set()
    assert listed(tag, show_terminated=True) == {x.sandbox_id, y.sandbox_id, done.sandbox_id}
    assert listed(tag, "role-x", show_terminated=True) == {x.sandbox_id, done.sandbox_id}
    assert listed(tag, status="completed") == {done.sandbox_id}
    assert listed(tag, status="running") == {x.sandbox_id, y.sandbox_id}
    by_id = {b.sandbox_id: b for b in Sandbox.list(tags=[tag], show_terminated=True).result(RPC)}
    assert by_id[done.sandbox_id].status == SandboxStatus.COMPLETED
    assert by_id[x.sandbox_id].status == SandboxStatus.RUNNING


def test_from_id_of_stopped_and_completed_sandboxes(sdk, tag):
    stopped = sdk.Sandbox.run(tags=[tag])
    stopped.wait(timeout=RPC)
    stopped.stop().result(timeout=RPC)
    done = sdk.Sandbox.run("sh", "-c", "exit 0", tags=[tag])
    done.wait_until_complete(timeout=RPC).result(timeout=RPC)

    again = sdk.Sandbox.from_id(stopped.sandbox_id).result(timeout=RPC)
    assert again.sandbox_id == stopped.sandbox_id
    assert again.status == sdk.SandboxStatus.TERMINATED
    assert tag in again.tags
    assert again.created_at is not None

    again = sdk.Sandbox.from_id(done.sandbox_id).result(timeout=RPC)
    assert again.status == sdk.SandboxStatus.COMPLETED
    # (from_id never fills `returncode`: the client keeps it for polled completions.)


def test_from_id_of_unknown_id_is_not_found():
    with pytest.raises(SandboxNotFoundError):
        Sandbox.from_id("sb-does-not-exist-0000").result(timeout=RPC)


# --------------------------------------------------------------------------- max lifetime


def test_max_lifetime_ends_in_terminated(sdk, tag):
    sb = sdk.Sandbox.run(max_lifetime_seconds=3, tags=[tag])
    sb.wait(timeout=RPC)
    start = time.monotonic()
    sb.wait_until_complete(timeout=RPC, raise_on_termination=False).result(timeout=RPC)
    elapsed = time.monotonic() - start
    assert sb.status == sdk.SandboxStatus.TERMINATED
    assert elapsed < 30, f"a 3 s lifetime ended after {elapsed:.1f}s more"
    assert "lifetime" in (sb.status_reason or "").lower(), sb.status_reason
    with pytest.raises(sdk.SandboxTerminatedError):
        sb.wait_until_complete(timeout=RPC).result(timeout=RPC)


# --------------------------------------------------------------------------- daemon restart


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_daemon_restart_keeps_sandboxes(server, tag, how):
    keep = Sandbox.run(tags=[tag])  # runs until stopped
    ends_while_down = Sandbox.run("sh", "-c", "sleep 2; exit 7", tags=[tag])
    ends_after = Sandbox.run("sh", "-c", "sleep 25; exit 0", tags=[tag])
    for sb in (keep, ends_while_down, ends_after):
        sb.wait(timeout=RPC)
    started = keep.started_at
    try:
        if how == "kill9":
            server.kill9()
        else:
            assert server.stop() == 0, "sandpitd exited non-zero on SIGTERM"
        time.sleep(4)  # ends_while_down's main command exits while no daemon runs
    finally:
        server.ensure_running()
    restarted = time.monotonic()

    # Queried right after the restart: the daemon must have reconciled what it adopted
    # before answering (no window in which a dead sandbox is still reported RUNNING).
    listed = ids(Sandbox.list(tags=[tag]).result(timeout=RPC))
    assert listed == {keep.sandbox_id, ends_after.sandbox_id}, (
        f"active after restart: {listed}; {ends_while_down.sandbox_id} exited while the daemon "
        "was down"
    )

    again = Sandbox.from_id(keep.sandbox_id).result(timeout=RPC)
    assert again.status == SandboxStatus.RUNNING
    assert again.started_at is not None and started is not None
    drift = abs((again.started_at - started).total_seconds())
    assert drift < 1, f"start_time moved by {drift:.3f}s across the restart"

    down = Sandbox.from_id(ends_while_down.sandbox_id).result(timeout=RPC)
    assert down.status == SandboxStatus.FAILED, "exit 7 while the daemon was down"
    assert_reports_exit_code(down, 7)

    after = Sandbox.from_id(ends_after.sandbox_id).result(timeout=RPC)
    assert after.status == SandboxStatus.RUNNING
    after.wait_until_complete(timeout=RPC).result(timeout=RPC)
    assert after.status == SandboxStatus.COMPLETED and after.returncode == 0
    assert time.monotonic() - restarted < 25, "the main command was started again?"

    # Client objects from before the restart keep working.
    assert keep.get_status() == SandboxStatus.RUNNING
    keep.stop(graceful_shutdown_seconds=1).result(timeout=RPC)
    assert keep.status == SandboxStatus.TERMINATED


# --------------------------------------------------------------------------- principals


def test_another_principals_sandbox_is_invisible(tag, other_principal):
    mine = Sandbox.run(tags=[tag])
    mine.wait(timeout=RPC)
    for auth in (other_principal.bearer, other_principal.wandb_header):
        with pytest.raises(SandboxNotFoundError):
            Sandbox.from_id(mine.sandbox_id, auth=auth).result(timeout=RPC)
        assert Sandbox.list(tags=[tag], auth=auth, show_terminated=True).result(RPC) == []
        with pytest.raises(SandboxNotFoundError):
            Sandbox.delete(mine.sandbox_id, auth=auth).result(timeout=RPC)
    assert mine.get_status() == SandboxStatus.RUNNING, "the other principal's delete hit it"

    theirs = Sandbox.run(tags=[tag], auth=other_principal.bearer)
    try:
        theirs.wait(timeout=RPC)
        with pytest.raises(SandboxNotFoundError):
            Sandbox.from_id(theirs.sandbox_id).result(timeout=RPC)
        assert ids(Sandbox.list(tags=[tag]).result(timeout=RPC)) == {mine.sandbox_id}
    finally:
        theirs.stop(missing_ok=True).result(timeout=RPC)


@pytest.mark.parametrize(
    "auth",
    [
        AuthHeaders(headers={}, strategy="none"),
        AuthHeaders(headers={"authorization": "Bearer not-a-key-" + "0" * 40}, strategy="api_key"),
        AuthHeaders(headers={"x-wandb-api-key": "not0a0key" + "0" * 40}, strategy="wandb_api_key"),
    ],
    ids=["no-key", "unknown-bearer", "unknown-wandb-key"],
)
def test_requests_without_a_valid_key_are_unauthenticated(auth):
    with pytest.raises(CWSandboxAuthenticationError):
        Sandbox.list(auth=auth).result(timeout=RPC)
    with pytest.raises(CWSandboxAuthenticationError):
        Sandbox.run(auth=auth)


# --------------------------------------------------------------------------- invalid specs

# (id, Sandbox.run kwargs, words of which one must name the field in the error)
# Resources use one-sided requests/limits so the client's own quantity check (which
# only compares keys set on both sides) lets the bad value through to the server.
INVALID_SPECS = [
    ("bad-image-reference", {"container_image": "Not A//Valid::Image"}, ("image",)),
    (
        "cpu-lots",
        {"resources": ResourceOptions(requests={"cpu": "lots"}, limits={"memory": "256Mi"})},
        ("cpu",),
    ),
    (
        "memory-12XB",
        {"resources": ResourceOptions(requests={"memory": "12XB"}, limits={"cpu": "1"})},
        ("memory",),
    ),
    ("negative-lifetime", {"max_lifetime_seconds": -5}, ("max_lifetime_seconds",)),
    (
        "relative-mounted-file",
        {"mounted_files": [{"mount_path": "relative/file.txt", "file_content": b"x"}]},
        ("files", "mount"),
    ),
]


@pytest.mark.parametrize(
    "kwargs,field_words", [p[1:] for p in INVALID_SPECS], ids=[p[0] for p in INVALID_SPECS]
)
def test_invalid_spec_is_rejected_with_a_validation_error(sdk, tag, kwargs, field_words):
    with pytest.raises(sdk.SandboxValidationError) as info:
        sdk.Sandbox.run(tags=[tag], **kwargs)
    err = info.value
    assert isinstance(err, CWSandboxValidationError)
    assert err.field_violations, "INVALID_ARGUMENT without BadRequest field violations"
    assert err.reason == "CWSANDBOX_INVALID_REQUEST", err.reason
    text = (str(err) + " " + " ".join(v.field for v in err.field_violations)).lower()
    assert any(w in text for w in field_words), f"error does not name {field_words}: {err}"
    assert sdk.Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC) == []


def test_gpu_request_is_refused_clearly(tag):
    with pytest.raises(CWSandboxError) as info:
        Sandbox.run(tags=[tag], resources={"gpu": 1})
    assert not isinstance(info.value, CWSandboxAuthenticationError)
    assert "gpu" in str(info.value).lower(), str(info.value)
    assert Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC) == []


def test_both_import_paths_are_the_same_client():
    import wandb.sandbox

    assert issubclass(wandb.sandbox.Sandbox, cwsandbox.Sandbox)
    assert wandb.sandbox.SandboxStatus is SandboxStatus
    assert wandb.sandbox.SandboxFailedError is SandboxFailedError
    assert wandb.sandbox.SandboxTerminatedError is SandboxTerminatedError
    assert wandb.sandbox.SandboxValidationError is SandboxValidationError
