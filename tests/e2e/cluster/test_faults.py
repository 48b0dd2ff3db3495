"""Issue 18, faults: a runner killed (its lease expires), a runner back within its lease
(re-adoption), a gateway killed under a stream (through the balancer), PostgreSQL
crashed and restarted. Each test leaves the topology whole again for the next."""

from __future__ import annotations

import re
import threading
import time

import conftest as e2e
import pytest

from cwsandbox import SandboxStatus

from .cluster import (
    LEASE_S,
    RPC,
    RUNNER_IDS,
    from_id,
    list_ids,
    live_runner_ids,
    run,
    started,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)


def processes_of(cluster, rid: str, sandbox_id: str) -> dict[int, str]:
    return {
        p: c for p, c in e2e.cgroup_procs([cluster.cgroup_parent(rid)]).items() if sandbox_id in c
    }


# --------------------------------------------------------------------------- 6. runner killed


def test_runner_killed_its_sandboxes_fail_and_it_comes_back(cluster, principal_a, tag):
    url = cluster.gateway.url
    victim = started(url, principal_a, tags=[tag], runner_ids=["r3"])
    bystander = started(url, principal_a, tags=[tag], runner_ids=["r1"])
    assert processes_of(cluster, "r3", victim.sandbox_id), "no process of the r3 sandbox found by cgroup"
    r3 = cluster.runners["r3"]

    r3.kill9()
    killed_at = time.monotonic()

    def failed():
        s = from_id(url, principal_a, victim.sandbox_id)
        return s if s.status == SandboxStatus.FAILED else None

    s = wait_for(failed, timeout=LEASE_S + 30, what="the r3 sandbox FAILED through the gateway")
    took = time.monotonic() - killed_at
    print(f"r3 killed: its sandbox FAILED after {took:.1f}s (lease {LEASE_S:g}s): {s.status_reason!r}")
    assert took <= LEASE_S + 8, f"FAILED only {took:.1f}s after the kill (lease {LEASE_S:g}s)"
    reason = s.status_reason or ""
    assert "r3" in reason and re.search(r"lease|heartbeat", reason, re.I), reason
    # Through the other gateway too, and the r1 sandbox is untouched.
    assert from_id(cluster.gateways[1].url, principal_a, victim.sandbox_id).status == SandboxStatus.FAILED
    assert from_id(url, principal_a, bystander.sandbox_id).status == SandboxStatus.RUNNING
    assert bystander.exec(["echo", "ok"]).result(timeout=RPC).stdout == "ok\n"

    # r3 is not offered while it is away, and new creates avoid it.
    for gw in cluster.gateways:
        assert "r3" not in live_runner_ids(gw.url, principal_a), f"{gw.name} lists r3 as healthy"
    fresh = [run(cluster.gateways[i % 2].url, principal_a, tags=[tag]) for i in range(4)]
    for b in fresh:
        b.wait(timeout=RPC)
    assert {b.runner_id for b in fresh} <= {"r1", "r2"}, [b.runner_id for b in fresh]

    # Back on the same data dir: it registers again and destroys what was failed meanwhile.
    r3.start()
    for gw in cluster.gateways:
        wait_for(lambda: "r3" in live_runner_ids(gw.url, principal_a), timeout=30,
                 what=f"{gw.name} listing r3 again")
    wait_for(lambda: not processes_of(cluster, "r3", victim.sandbox_id), timeout=15,
             what="the failed r3 sandbox's processes destroyed by the restarted r3")
    assert from_id(url, principal_a, victim.sandbox_id).status == SandboxStatus.FAILED
    # Creates land on it again: pinned, and by spread (it is now the emptiest).
    pinned = started(url, principal_a, tags=[tag], runner_ids=["r3"])
    assert pinned.runner_id == "r3"
    assert pinned.exec(["echo", "r3-back"]).result(timeout=RPC).stdout == "r3-back\n"
    spread = started(cluster.gateways[1].url, principal_a, tags=[tag])
    assert spread.runner_id == "r3", (
        spread.runner_id, list_ids(url, principal_a, tags=[tag])
    )


# --------------------------------------------------------------------------- 7. runner back in time


def test_runner_back_within_its_lease_keeps_its_sandboxes(cluster, principal_a, tag):
    url = cluster.gateway.url
    sb = started(url, principal_a, tags=[tag], runner_ids=["r2"])
    sb.write_file("/tmp/before.txt", b"kept across the restart").result(timeout=RPC)
    r2 = cluster.runners["r2"]

    t0 = time.monotonic()
    r2.kill9()
    r2.start()
    back = time.monotonic() - t0
    print(f"r2 kill -9 and start again: accepting after {back:.2f}s (lease {LEASE_S:g}s)")
    assert back < LEASE_S, f"precondition: r2 took {back:.2f}s to come back, not less than the lease"

    # Through two leases' time it stays RUNNING (it is never failed by a lease expiry).
    deadline = time.monotonic() + 2 * LEASE_S + 1
    seen = []
    while time.monotonic() < deadline:
        try:
            seen.append(from_id(url, principal_a, sb.sandbox_id).status)
        except Exception as e:  # noqa: BLE001 - a moment of unavailability is reported, not fatal
            seen.append(type(e).__name__)
        time.sleep(0.25)
    assert SandboxStatus.FAILED not in seen, seen
    assert seen[-1] == SandboxStatus.RUNNING, seen
    # Re-adopted: exec (the old client object) and its files.
    r = sb.exec(["cat", "/tmp/before.txt"]).result(timeout=RPC)
    assert (r.stdout, r.returncode) == ("kept across the restart", 0)
    assert "r2" in live_runner_ids(cluster.gateways[1].url, principal_a)


# --------------------------------------------------------------------------- 8. gateway killed mid-stream

TICKER = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.1)\n"


def test_gateway_killed_mid_stream(cluster, principal_a, tag):
    bal = cluster.balancer
    # Through the gateways on purpose: a direct stream (DataPlaneMode AUTO on r1 or r2)
    # would not pass them at all (test_direct.py).
    sb = started(bal.url, principal_a, tags=[tag], data_plane="gateway")
    proc = sb.exec(["python", "-c", TICKER], timeout_seconds=120)
    items: list[str] = []
    errors: list[BaseException] = []
    finished = threading.Event()

    def consume():
        try:
            for item in proc.stdout:
                items.append(item)
            proc.result(timeout=RPC)
        except BaseException as e:  # noqa: BLE001 - what the test looks at
            errors.append(e)
        finally:
            finished.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    wait_for(lambda: len(items) >= 5, timeout=30, what="the exec's first lines")
    carriers = bal.streaming_backends(1.0)
    assert len(carriers) == 1, f"the stream's gateway is not identifiable: {carriers} {bal.snapshot()}"
    (victim,) = carriers
    gw = cluster.gateways[victim]
    other = 1 - victim
    accepted_other = bal.accepted[other]

    gw.kill9()
    killed_at = time.monotonic()
    lines_at_kill = len(items)
    assert finished.wait(30), f"the stream through the killed {gw.name} hangs (30 s after the kill)"
    took = time.monotonic() - killed_at
    print(f"{gw.name} killed: the stream ended after {took:.2f}s with "
          f"{[f'{type(e).__name__}: {e}' for e in errors]}")
    assert errors, (
        f"the stream through the killed {gw.name} ended without an error "
        f"({len(items)} lines, {lines_at_kill} at the kill): a cut stream must not look complete"
    )
    assert len(items) < 600

    try:
        # The next calls through the balancer go to the other gateway; the sandbox is intact.
        r = sb.exec(["echo", "after"]).result(timeout=RPC)
        assert (r.stdout, r.returncode) == ("after\n", 0)
        assert from_id(bal.url, principal_a, sb.sandbox_id).status == SandboxStatus.RUNNING
        assert bal.accepted[other] > accepted_other, "no new connection went to the other gateway"
        # The cut exec did not outlive its stream: the runner killed it.
        def ticker_gone():
            out = sb.exec(
                ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"]
            ).result(timeout=RPC).stdout
            return "range(600)" not in out
        wait_for(ticker_gone, timeout=15, what="the cut exec's process gone from the sandbox")
    finally:
        gw.start()
    wait_for(lambda: set(RUNNER_IDS) <= live_runner_ids(gw.url, principal_a), timeout=30,
             what=f"the restarted {gw.name} listing the runners")
    assert from_id(gw.url, principal_a, sb.sandbox_id).status == SandboxStatus.RUNNING


LOGGER = "import time\nfor i in range(40):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n"
LOG_LINES = [f"line {i}\n" for i in range(40)]


def test_gateway_killed_under_a_followed_log_stream(cluster, principal_a, tag):
    """The client resumes a followed log stream after UNAVAILABLE (three tries). Through the
    balancer the resume reaches the other gateway: either it continues with exactly the
    lines printed (no gap, no repeat), or the stream ends with an error; never a hang."""
    bal = cluster.balancer
    sb = run(bal.url, principal_a, "python", "-c", LOGGER, tags=[tag], data_plane="gateway")
    sb.wait(timeout=RPC)
    got: list[str] = []
    errors: list[BaseException] = []
    finished = threading.Event()

    def consume():
        try:
            for line in sb.stream_logs(follow=True):
                got.append(line)
        except BaseException as e:  # noqa: BLE001 - what the test looks at
            errors.append(e)
        finally:
            finished.set()

    threading.Thread(target=consume, daemon=True).start()
    wait_for(lambda: len(got) >= 5, timeout=30, what="the first log lines")
    carriers = bal.streaming_backends(0.5)
    assert len(carriers) == 1, f"the stream's gateway is not identifiable: {carriers} {bal.snapshot()}"
    (victim,) = carriers
    gw = cluster.gateways[victim]
    gw.kill9()
    try:
        assert finished.wait(40), f"the followed log stream hangs after {gw.name} was killed ({len(got)} lines)"
        print(f"{gw.name} killed under stream_logs: {len(got)}/40 lines, errors "
              f"{[f'{type(e).__name__}: {e}' for e in errors]}")
        if errors:
            assert got == LOG_LINES[: len(got)], f"lines before the error are not a prefix: {got}"
        else:
            assert got == LOG_LINES, f"resumed through the other gateway with a gap or a repeat: {got}"
        # The whole output is there through the other gateway.
        sb.wait_until_complete(timeout=RPC).result(timeout=RPC)
        assert list(sb.stream_logs()) == LOG_LINES
    finally:
        gw.start()
    wait_for(lambda: set(RUNNER_IDS) <= live_runner_ids(gw.url, principal_a), timeout=30,
             what=f"the restarted {gw.name} listing the runners")


# --------------------------------------------------------------------------- 9. PostgreSQL restarted


def test_postgres_restarted(cluster, principal_a, principal_b, tag):
    gws = cluster.gateways
    before = {}
    for i, rid in enumerate(RUNNER_IDS):
        sb = started(gws[i % 2].url, principal_a, tags=[tag], runner_ids=[rid])
        before[sb.sandbox_id] = SandboxStatus.RUNNING
    done = run(gws[0].url, principal_b, "python", "-c", "print('done')", tags=[tag])
    done.wait_until_complete(timeout=RPC).result(timeout=RPC)
    stopped = started(gws[1].url, principal_a, tags=[tag])
    stopped.stop(missing_ok=True).result(timeout=RPC)
    owners = {sid: principal_a for sid in before}
    before[done.sandbox_id] = SandboxStatus.COMPLETED
    owners[done.sandbox_id] = principal_b
    before[stopped.sandbox_id] = SandboxStatus.TERMINATED
    owners[stopped.sandbox_id] = principal_a

    down = cluster.pg.crash_restart()
    restarted_at = time.monotonic()
    print(f"postgres: SIGQUIT and start again took {down:.2f}s")

    # Creates through both gateways succeed again (a short retry window).
    for gw in gws:
        def create_ok(gw=gw):
            sb = run(gw.url, principal_a, tags=[tag])
            sb.wait(timeout=RPC)
            return sb
        sb = wait_for(create_ok, timeout=30, interval=0.5, what=f"a create through {gw.name}")
        assert sb.status == SandboxStatus.RUNNING and sb.runner_id in RUNNER_IDS
    print(f"postgres: creates through both gateways again {time.monotonic() - restarted_at:.1f}s after the restart")
    # Every runner is live again for both gateways.
    for gw in gws:
        wait_for(lambda gw=gw: set(RUNNER_IDS) <= live_runner_ids(gw.url, principal_a), timeout=30,
                 what=f"{gw.name} listing every runner live")
    # Every record from before is still there.
    after = {}
    for sid, state in before.items():
        for gw in gws:
            after[(sid, gw.name)] = from_id(gw.url, owners[sid], sid).status
    print(f"postgres: states before {before}, after {after}")
    for (sid, gw_name), state in after.items():
        assert state not in (None, SandboxStatus.UNSPECIFIED), (sid, gw_name, state)
        if before[sid] != SandboxStatus.RUNNING:
            assert state == before[sid], (sid, gw_name, before[sid], state)
    # PostgreSQL was down for well under a lease: nothing may have been failed for it.
    failed = {k: v for k, v in after.items() if v != before[k[0]]}
    assert not failed, f"states changed across a {down:.2f}s PostgreSQL restart: {failed}"
