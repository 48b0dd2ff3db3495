"""Issue 18, the cluster through the unmodified client: spread, the data plane on every
runner, pins, tenancy across runners, discovery. Everything goes through a gateway
(gw1 unless said otherwise); runners are only ever reached by the gateways."""

from __future__ import annotations

import collections
import hashlib
import os

import grpc
import pytest

from cwsandbox import SandboxStatus
from cwsandbox.exceptions import CWSandboxError, RunnerNotFoundError, SandboxNotFoundError

from .cluster import RPC, RUNNER_IDS, get_runner, list_ids, list_runners, run, started

# The first test pays for the cluster's start-up (images, PostgreSQL, five daemons).
pytestmark = pytest.mark.timeout(300)

PRINTER = "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)\n"
LINES = [f"line {i}\n" for i in range(5)]


def stop_all(boxes) -> None:
    refs = [b.stop(graceful_shutdown_seconds=1, missing_ok=True) for b in boxes]
    for r in refs:
        r.result(timeout=RPC)


def live_ids(cluster, *principals) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in principals:
        out.update(list_ids(cluster.gateway.url, p))
    return out


# --------------------------------------------------------------------------- 1. spread


def test_spread_six_creates_land_two_per_runner(cluster, principal_a, principal_b, tag):
    assert not live_ids(cluster, principal_a, principal_b), "precondition: no live sandboxes"
    boxes = [run(cluster.gateway.url, principal_a, tags=[tag]) for _ in range(6)]
    try:
        for b in boxes:
            b.wait(timeout=RPC)
        placed = collections.Counter(b.runner_id for b in boxes)
        assert placed == {"r1": 2, "r2": 2, "r3": 2}, placed
        # The listing through the other gateway agrees.
        listed = list_ids(cluster.gateways[1].url, principal_a, tags=[tag])
        assert listed == {b.sandbox_id: b.runner_id for b in boxes}
    finally:
        stop_all(boxes)


# --------------------------------------------------------------------------- 2. data plane per runner


@pytest.mark.parametrize("rid", RUNNER_IDS)
def test_lifecycle_exec_files_logs_on_each_runner(cluster, principal_a, tag, rid):
    url = cluster.gateway.url
    sb = started(url, principal_a, tags=[tag], runner_ids=[rid])
    try:
        assert sb.status == SandboxStatus.RUNNING
        assert sb.runner_id == rid
        # exec: stdout, stderr, exit code
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result(timeout=RPC)
        assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 3)
        # exec with stdin
        p = sb.exec(["cat"], stdin=True)
        p.stdin.write(b"hello\n").result(timeout=RPC)
        p.stdin.writeline("world").result(timeout=RPC)
        p.stdin.close().result(timeout=RPC)
        r = p.result(timeout=RPC)
        assert (r.stdout, r.returncode) == ("hello\nworld\n", 0)
        # files: binary, bytes exact, both ways
        blob = os.urandom(300_000) + bytes(range(256))
        sb.write_file("/tmp/d/blob.bin", blob).result(timeout=RPC)
        assert sb.read_file("/tmp/d/blob.bin").result(timeout=RPC) == blob
        r = sb.exec(["sha256sum", "/tmp/d/blob.bin"]).result(timeout=RPC)
        assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        sb.exec(["sh", "-c", "printf made-inside > /tmp/inside.txt"]).result(timeout=RPC)
        assert sb.read_file("/tmp/inside.txt").result(timeout=RPC) == b"made-inside"
        # stop -> TERMINATED, readable through both gateways
        sb.stop(missing_ok=True).result(timeout=RPC)
        assert sb.status == SandboxStatus.TERMINATED
        for gw in cluster.gateways:
            from cwsandbox import Sandbox

            got = Sandbox.from_id(sb.sandbox_id, base_url=gw.url, auth=principal_a.bearer).result(
                timeout=RPC
            )
            assert got.status == SandboxStatus.TERMINATED, (gw.name, got.status)
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)

    # logs: the main process's output streamed while it runs, then COMPLETED
    lb = run(url, principal_a, "python", "-c", PRINTER, tags=[tag], runner_ids=[rid])
    lb.wait(timeout=RPC)
    assert lb.runner_id == rid
    assert list(lb.stream_logs(follow=True)) == LINES
    lb.wait_until_complete(timeout=RPC).result(timeout=RPC)
    assert lb.status == SandboxStatus.COMPLETED
    assert lb.returncode == 0
    assert list(lb.stream_logs(tail_lines=2)) == LINES[-2:]


# --------------------------------------------------------------------------- 3. pins


def test_pin_lands_on_the_pinned_runner(cluster, principal_a, tag):
    # On an empty cluster spread alone would start with r1: three pinned creates on r2.
    boxes = [run(cluster.gateway.url, principal_a, tags=[tag], runner_ids=["r2"]) for _ in range(3)]
    try:
        for b in boxes:
            b.wait(timeout=RPC)
        assert [b.runner_id for b in boxes] == ["r2", "r2", "r2"]
        assert set(list_ids(cluster.gateway.url, principal_a, tags=[tag], runner_ids=["r2"])) == {
            b.sandbox_id for b in boxes
        }
        assert list_ids(cluster.gateway.url, principal_a, tags=[tag], runner_ids=["r1"]) == {}
    finally:
        stop_all(boxes)


def test_pin_to_an_unregistered_runner_is_refused(cluster, principal_a, tag):
    with pytest.raises(CWSandboxError) as info:
        sb = run(cluster.gateway.url, principal_a, tags=[tag], runner_ids=["nope"])
        sb.wait(timeout=RPC)  # only reached when the create was accepted
    err = info.value
    cause = err.__cause__
    code = cause.code() if isinstance(cause, grpc.RpcError) else None
    print(f"pin to 'nope': {type(err).__name__} code={code} reason={getattr(err, 'reason', None)}: {err}")
    assert "nope" in str(err), f"the refusal does not name the runner: {type(err).__name__}: {err}"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"expected INVALID_ARGUMENT, got {code} ({type(err).__name__}, reason "
        f"{getattr(err, 'reason', None)}): {err}"
    )
    assert list_ids(cluster.gateway.url, principal_a, tags=[tag], show_terminated=True) == {}


# --------------------------------------------------------------------------- 4. tenancy


def _raw_stream_exec(url: str, key: str, sandbox_id: str) -> grpc.RpcError | None:
    """StreamExec with the client's own protobuf types (the client cannot exec on an id
    it was not given by Get/List); returns the RPC's error, None when it ran."""
    from cwsandbox._proto import sandbox_pb2, sandbox_pb2_grpc

    target = url.removeprefix("http://")
    with grpc.insecure_channel(target) as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        init = sandbox_pb2.ExecStreamInit(sandbox_id=sandbox_id, command=["echo", "leak"])
        reqs = iter([sandbox_pb2.ExecStreamRequest(init=init)])
        try:
            list(stub.StreamExec(reqs, metadata=[("authorization", f"Bearer {key}")], timeout=30))
        except grpc.RpcError as e:
            return e
    return None


def test_tenancy_across_runners(cluster, principal_a, principal_b, tag):
    url = cluster.gateway.url
    a_boxes = [started(url, principal_a, tags=[tag], runner_ids=[rid]) for rid in RUNNER_IDS]
    b_box = started(cluster.gateways[1].url, principal_b, tags=[tag])
    try:
        a_ids = {b.sandbox_id for b in a_boxes}
        assert {b.runner_id for b in a_boxes} == set(RUNNER_IDS)
        for gw in cluster.gateways:
            b_sees = set(list_ids(gw.url, principal_b, show_terminated=True))
            assert not (a_ids & b_sees), f"{gw.name} lists A's sandboxes to B"
            assert b_box.sandbox_id in b_sees
            assert b_box.sandbox_id not in list_ids(gw.url, principal_a, show_terminated=True)
            assert list_ids(gw.url, principal_b, tags=[tag], runner_ids=list(RUNNER_IDS)) == {
                b_box.sandbox_id: b_box.runner_id
            }
        from cwsandbox import Sandbox

        for box in a_boxes:
            with pytest.raises(SandboxNotFoundError):
                Sandbox.from_id(box.sandbox_id, base_url=url, auth=principal_b.bearer).result(timeout=RPC)
            with pytest.raises(SandboxNotFoundError):
                Sandbox.delete(box.sandbox_id, base_url=url, auth=principal_b.bearer).result(timeout=RPC)
            err = _raw_stream_exec(url, principal_b.key, box.sandbox_id)
            assert err is not None, f"B ran a command in A's sandbox on {box.runner_id}"
            assert err.code() == grpc.StatusCode.NOT_FOUND, (box.runner_id, err.code(), err.details())
            # Still A's, still running, still answering A.
            assert box.exec(["echo", "mine"]).result(timeout=RPC).stdout == "mine\n"
        # A cannot touch B's either, and the refusal is the same as for an unknown id.
        with pytest.raises(SandboxNotFoundError):
            Sandbox.from_id(b_box.sandbox_id, base_url=url, auth=principal_a.bearer).result(timeout=RPC)
        assert _raw_stream_exec(url, principal_a.key, b_box.sandbox_id).code() == grpc.StatusCode.NOT_FOUND
        assert _raw_stream_exec(url, principal_a.key, "no-such-sandbox").code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop_all([*a_boxes, b_box])


# --------------------------------------------------------------------------- 5. discovery


def test_discovery_lists_every_runner_with_capacity(cluster, principal_a, tag):
    sb = started(cluster.gateway.url, principal_a, tags=[tag], runner_ids=["r3"])
    try:
        for gw in cluster.gateways:
            runners = {r.runner_id: r for r in list_runners(gw.url, principal_a)}
            assert set(RUNNER_IDS) <= set(runners), (gw.name, sorted(runners))
            for rid in RUNNER_IDS:
                r = runners[rid]
                assert r.healthy, (gw.name, r)
                assert r.max_cpu_millicores > 0 and r.max_memory_bytes > 0, (gw.name, r)
                assert r.supported_architectures, (gw.name, r)
                assert r.resources is not None, f"{gw.name}: no resources in the full view of {rid}"
                assert 0 < r.resources.available_cpu_millicores <= r.max_cpu_millicores, (gw.name, r.resources)
                assert r.resources.available_memory_bytes > 0, (gw.name, r.resources)
            assert runners["r3"].resources.running_sandboxes >= 1, (gw.name, runners["r3"].resources)
            got = get_runner(gw.url, principal_a, "r2", runners["r2"].organization_id)
            assert got.runner_id == "r2" and got.max_cpu_millicores == runners["r2"].max_cpu_millicores
            with pytest.raises(RunnerNotFoundError):
                get_runner(gw.url, principal_a, "nope", runners["r2"].organization_id)
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)
