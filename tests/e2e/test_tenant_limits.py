"""Issue 15: a hostile tenant cannot exhaust the host, shown from inside the sandbox.

Through the real `cwsandbox` client only: the default memory, CPU and disk limits of a
daemon with no config (the session's), the writable layer's `ENOSPC`, `nproc` / `free` /
`os.cpu_count()` following the limits (LXCFS views and the CPU affinity), no host path
in `/proc/self/mountinfo`, and, on daemons of their own, admission by requests
(RESOURCE_EXHAUSTED + CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED + RetryInfo, retried by the
client; CWSANDBOX_RESOURCE_CEILING_EXCEEDED for what never fits), discovery's figures,
and the data dir's reserve refusing creates while running sandboxes keep working.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from test_parity import read_cgroup
from conftest import Binaries, E2EDirs, Principal, Server, free_port, import_test_images, sweep

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120
STORAGE = "sandpit.dev/ephemeral-storage"


def sh(sb, script: str):
    return sb.exec(["sh", "-c", script], check=False).result(timeout=RPC)


@pytest.fixture
def started(tag):
    import cwsandbox

    boxes = []

    def start(*args, **kwargs):
        sb = cwsandbox.Sandbox.run(*args, tags=[tag], **kwargs)
        boxes.append(sb)
        return sb

    yield start
    for sb in boxes:
        sb.stop(missing_ok=True).result(timeout=RPC)


def meminfo_kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in {text!r}")


# --------------------------------------------------------------------------- defaults


def test_a_sandbox_that_asks_for_nothing_is_capped(started):
    sb = started()
    # 1.5 GiB is more than the default 1 GiB limit: the allocation dies (OOM kill).
    r = sh(sb, "python3 -c 'b = bytearray(1536 << 20); b[::4096] = b\"x\" * len(b[::4096])'")
    assert r.returncode != 0, "a 1.5 GiB allocation succeeded under the default limit"
    assert r.returncode in (137, 1), (r.returncode, r.stderr)
    # Well under it, it works.
    r = sh(sb, "python3 -c 'b = bytearray(256 << 20); print(len(b))'")
    assert (r.returncode, r.stdout.strip()) == (0, str(256 << 20)), r.stderr
    # What the tenant sees: 1 GiB of memory, one CPU, a 10 GiB root.
    r = sh(sb, "cat /proc/meminfo; echo; nproc; python3 -c 'import os; print(os.cpu_count())'; df -B1 --output=size / | tail -1")
    assert r.returncode == 0, r.stderr
    assert meminfo_kib(r.stdout, "MemTotal") == 1 << 20
    *_, nproc, cpu_count, root_size = r.stdout.split()
    assert (nproc, cpu_count) == ("1", "1")
    assert 9 << 30 < int(root_size) <= 10 << 30, root_size
    # The caps are the kernel's, on the host side: memory, CPU quota, pids.
    assert read_cgroup(sb.sandbox_id, "memory", "memory.limit_in_bytes", "memory.max") == str(1 << 30)
    assert read_cgroup(sb.sandbox_id, "pids", "pids.max", "pids.max") == "4096"
    quota = read_cgroup(sb.sandbox_id, "cpu", "cpu.cfs_quota_us", "cpu.max")
    assert quota.split()[0] == "100000", quota


# --------------------------------------------------------------------------- disk


def test_the_writable_layer_ends_in_enospc_and_frees_nothing_on_the_host(started, data_dir):
    sb = started(annotations={STORAGE: "64Mi"})
    sh(sb, "echo keep > /etc/keep")
    r = sh(sb, "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1; echo rc=$?; sync")
    assert "No space left on device" in r.stdout, r.stdout
    assert "rc=1" in r.stdout
    # Full, and still working: what was written before is intact, the sandbox
    # execs, deleting frees the space for new writes.
    assert sb.read_file("/etc/keep").result(timeout=RPC) == b"keep\n"
    r = sh(sb, "rm /tmp/fill && head -c 1048576 /dev/zero > /tmp/again && stat -c %s /tmp/again")
    assert (r.returncode, r.stdout.strip()) == (0, "1048576"), r.stderr
    r = sh(sb, "df -B1 --output=size / | tail -1")
    assert 32 << 20 < int(r.stdout) <= 64 << 20, r.stdout
    # The image on the host is sparse: never more than the limit.
    images = list((data_dir / "sandboxes").glob(f"{sb.sandbox_id}/disk.img"))
    assert len(images) == 1, images
    assert images[0].stat().st_blocks * 512 <= (64 << 20) + (4 << 20)


def test_a_bad_ephemeral_storage_annotation_names_the_field():
    import cwsandbox

    for bad in ["lots", "1Mi", "5Ti"]:
        with pytest.raises(cwsandbox.CWSandboxError) as e:
            cwsandbox.Sandbox.run(annotations={STORAGE: bad})
        assert STORAGE in str(e.value), (bad, e.value)


# --------------------------------------------------------------------------- inside views


def test_cpus_and_memory_seen_inside_follow_the_limits(started):
    sb = started(resources={"cpu": "500m", "memory": "384Mi"})
    r = sh(
        sb,
        "nproc; python3 -c 'import os; print(os.cpu_count(), len(os.sched_getaffinity(0)))'; "
        "free -b | awk '/^Mem:/ {print $2}'; grep -c ^processor /proc/cpuinfo",
    )
    assert r.returncode == 0, r.stderr
    nproc, cpu_count, affinity, free_total, processors = r.stdout.split()
    assert (nproc, cpu_count, affinity, processors) == ("1", "1", "1", "1"), r.stdout
    assert int(free_total) == 384 << 20
    # The limit is enforced too, not only shown: the memory cgroup says so.
    assert read_cgroup(sb.sandbox_id, "memory", "memory.limit_in_bytes", "memory.max") == str(384 << 20)


def test_lxcfs_runs_in_its_own_cgroup_and_is_started_again_when_it_dies(started):
    """The host-wide LXCFS is not in the daemon's cgroup (stopping a unit does not take it
    down), and when it dies anyway the daemon starts it again: later sandboxes get the
    views back. The stale mount left behind is replaced, not reused."""
    import os
    import signal

    pid = int(Path("/run/sandpit/lxcfs.pid").read_text().strip())
    groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    assert groups and all(g.split(":", 2)[2].startswith("/sandpit-lxcfs") for g in groups), groups
    def alive() -> bool:
        # A zombie (its parent, PID 1 here, reaps when it will) is dead.
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), "lxcfs survived SIGKILL"
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sb = started(resources={"memory": "384Mi"})
        r = sh(sb, "head -1 /proc/meminfo")
        seen.append((r.returncode, r.stdout.strip()))
        sb.stop().result(timeout=RPC)
        if r.returncode == 0 and meminfo_kib(r.stdout, "MemTotal") == 384 << 10:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no sandbox saw its memory limit again after lxcfs died: {seen}")
    assert int(Path("/run/sandpit/lxcfs.pid").read_text().strip()) != pid


def test_mountinfo_shows_no_host_paths(started, data_dir):
    sb = started()
    text = sh(sb, "cat /proc/self/mountinfo").stdout
    assert text.strip(), "empty mountinfo"
    for needle in [str(data_dir), str(data_dir.resolve()), sb.sandbox_id, "/sandboxes/", "/store/"]:
        assert needle not in text, f"{needle!r} in mountinfo:\n{text}"
    # The root is still the overlay of the image's layers.
    root = [l for l in text.splitlines() if l.split()[4] == "/"]
    assert root and " - overlay overlay " in root[0], root


# --------------------------------------------------------------------------- own daemons


def own_daemon(tmp: Path, binaries: Binaries, e2e_dirs: E2EDirs, key: str, extra: str) -> Server:
    data = tmp / "data"
    data.mkdir()
    import_test_images(binaries, e2e_dirs.root, data)
    config = tmp / "sandpitd.toml"
    config.write_text(f"[network]\nenabled = false\n[storage]\nenabled = false\n{extra}")
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data,
        keys=[key],
        log_path=tmp / "sandpitd.log",
        config=config,
        port=free_port(),
    )
    srv.start()
    return srv


@pytest.fixture
def daemon(tmp_path, binaries, e2e_dirs, principal_a, monkeypatch):
    servers: list[Server] = []

    def start(extra: str, sub: str = "a") -> Server:
        d = tmp_path / sub
        d.mkdir()
        srv = own_daemon(d, binaries, e2e_dirs, principal_a.key, extra)
        servers.append(srv)
        monkeypatch.setenv("CWSANDBOX_BASE_URL", srv.url)
        return srv

    yield start
    for srv in servers:
        if srv.alive():
            sweep(srv, [principal_a])
            srv.stop()
    for srv in servers:
        shutil.rmtree(srv.data_dir, ignore_errors=True)


def test_creates_are_admitted_by_their_requests(daemon):
    import cwsandbox

    daemon('[limits]\nallocatable_cpu = "1"\nallocatable_memory = "2Gi"\n')
    runner = cwsandbox.list_runners(include_resources=True)[0]
    assert (runner.max_cpu_millicores, runner.max_memory_bytes) == (1000, 2 << 30)
    assert runner.resources.available_cpu_millicores == 1000
    first = cwsandbox.Sandbox.run(resources={"requests": {"cpu": "600m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}})
    try:
        first.wait(timeout=RPC)
        # Discovery reports what the live sandboxes' requests leave.
        after = cwsandbox.list_runners(include_resources=True)[0].resources
        assert after.available_cpu_millicores == 400
        assert after.available_memory_bytes <= (2 << 30) - (256 << 20)
        with pytest.raises(cwsandbox.CWSandboxError) as e:
            cwsandbox.Sandbox.run(resources={"requests": {"cpu": "600m"}, "limits": {"cpu": "1"}}).wait(timeout=RPC)
        err = e.value
        assert err.reason == "CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED", (err.reason, err)
        assert err.retry_delay is not None and err.retry_delay.total_seconds() > 0
        assert err.metadata.get("resource") == "cpu", err.metadata
        assert err.metadata.get("available") == "400", err.metadata
        assert "cpu request of 600m" in str(err), err
        # More than the whole runner: never retried, named as a ceiling.
        with pytest.raises(cwsandbox.CWSandboxError) as e:
            cwsandbox.Sandbox.run(resources={"cpu": "3"}).wait(timeout=RPC)
        assert e.value.reason == "CWSANDBOX_RESOURCE_CEILING_EXCEEDED", e.value
        # A create with a retry budget waits for the capacity to come back.
        threading.Timer(2.0, lambda: first.stop().result(timeout=RPC)).start()
        started_at = time.monotonic()
        again = cwsandbox.Sandbox.run(
            resources={"requests": {"cpu": "600m"}, "limits": {"cpu": "1"}},
            defaults=cwsandbox.SandboxDefaults(create_retry_budget_seconds=60),
        )
        again.wait(timeout=RPC)
        assert time.monotonic() - started_at >= 1.5
        assert again.exec(["true"]).result(timeout=RPC).returncode == 0
        again.stop().result(timeout=RPC)
    finally:
        first.stop(missing_ok=True).result(timeout=RPC)


def test_below_the_data_dir_reserve_creates_are_refused_and_running_sandboxes_work(daemon):
    import cwsandbox

    srv = daemon('[limits]\ndata_dir_reserve = "1Mi"\n')
    sb = cwsandbox.Sandbox.run("sh", "-c", "echo hello-log; exec sleep infinity")
    sb.wait(timeout=RPC)
    # The disk now has less free space than the reserve (a reserve above the
    # free space, rather than filling the host's disk).
    free = shutil.disk_usage(srv.data_dir).free
    srv.config.write_text(
        srv.config.read_text().replace('data_dir_reserve = "1Mi"', f'data_dir_reserve = "{free + (100 << 30)}"')
    )
    srv.restart()
    with pytest.raises(cwsandbox.CWSandboxError) as e:
        cwsandbox.Sandbox.run().wait(timeout=RPC)
    err = e.value
    assert err.reason == "CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED", (err.reason, err)
    assert err.metadata.get("resource") == "ephemeral-storage", err.metadata
    assert "below the reserve" in str(err), err
    # The running sandbox, its logs and its records keep working.
    again = cwsandbox.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC)
    assert again.exec(["echo", "still"]).result(timeout=RPC).stdout == "still\n"
    logs = "".join(again.stream_logs(follow=False))
    assert "hello-log" in logs, logs
    again.stop().result(timeout=RPC)
