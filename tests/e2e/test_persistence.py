"""Issue 14 acceptance: volumes and file-system snapshots through the real client only.

Scratch volumes (DISK size-enforced, MEMORY counted against the sandbox's memory),
snapshots (manual, on stop, concurrent, while a process writes, restore, list/get/delete,
another principal's NOT_FOUND, a tampered archive refused, archives collected),
registered volumes (shared by two sandboxes, deletion refused while mounted), and a
`kill -9` of sandpitd during a snapshot (a daemon of its own).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from test_parity import read_cgroup
from conftest import (
    Binaries,
    E2EDirs,
    Principal,
    Server,
    free_port,
    import_test_images,
    mounts_under,
    sweep,
)

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120  # seconds: bound on any single client operation's .result()

PAYLOAD = (
    "set -e; mkdir -p /workspace/d/e; "
    "head -c 3000000 /dev/urandom > /workspace/d/big; "
    "for i in $(seq 1 50); do echo file-$i > /workspace/d/e/f$i; done; "
    "ln -s d/big /workspace/link; chmod 0751 /workspace/d/e; "
    "cd /workspace && find . -type f | sort | xargs sha256sum"
)
DIGEST = "cd /workspace && find . -type f | sort | xargs sha256sum"


def scratch(cw, **kw):
    kw.setdefault("name", "workspace")
    kw.setdefault("mount_path", "/workspace")
    return cw.ScratchVolumeOptions(**kw)


def run(sb, *argv, check=True):
    r = sb.exec(list(argv)).result(timeout=RPC)
    if check:
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r


def blobs(data_dir: Path) -> set[Path]:
    root = data_dir / "snapshots" / "sha256"
    return set(root.iterdir()) if root.exists() else set()


@pytest.fixture
def cw():
    import cwsandbox

    return cwsandbox


def test_scratch_volume_snapshot_restores_the_same_bytes_into_another_sandbox(cw, tag):
    with cw.Sandbox.run(tags=[tag], volumes=[scratch(cw, size="256Mi")]) as sb:
        written = run(sb, "sh", "-c", PAYLOAD).stdout
        assert written.count("\n") == 51
        snap_id = sb.snapshot().result(timeout=RPC)
        snap = cw.Sandbox.get_snapshot(snap_id).result(timeout=RPC)
        assert snap.status == cw.FileSystemSnapshotStatus.READY
        assert snap.source_sandbox_id == sb.sandbox_id
        assert snap.source_volume_name == "workspace"
        assert snap.size_bytes > 3_000_000
        # The source keeps running and changing; the snapshot does not.
        run(sb, "sh", "-c", "echo later > /workspace/later")
    vols = [scratch(cw, size="256Mi", restore_from_snapshot_id=snap_id)]
    with cw.Sandbox.run(tags=[tag], volumes=vols) as child:
        assert run(child, "sh", "-c", DIGEST).stdout == written
        assert run(child, "readlink", "/workspace/link").stdout.strip() == "d/big"
        assert run(child, "stat", "-c", "%a", "/workspace/d/e").stdout.strip() == "751"
        assert run(child, "test", "-e", "/workspace/later", check=False).returncode == 1
        # Restored files belong to the sandbox: it can change them.
        run(child, "sh", "-c", "echo x >> /workspace/d/e/f1")
    cw.Sandbox.delete_snapshot(snap_id).result(timeout=RPC)


def test_snapshot_on_stop_then_list_get_delete_and_another_principals_not_found(
    cw, tag, other_principal: Principal
):
    sb = cw.Sandbox.run(tags=[tag], file_system_snapshot=cw.FileSystemSnapshotOptions(mount_path="/workspace"))
    run(sb, "sh", "-c", "echo kept > /workspace/note")
    sb.stop(snapshot_on_stop=True).result(timeout=RPC)
    snap_id = sb.file_system_snapshot_id
    assert snap_id
    snap = cw.Sandbox.get_snapshot(snap_id).result(timeout=RPC)
    assert snap.status == cw.FileSystemSnapshotStatus.READY
    assert snap.trigger == cw.FileSystemSnapshotTrigger.ON_DELETE
    listed = cw.Sandbox.list_snapshots(source_sandbox_id=sb.sandbox_id).result(timeout=RPC)
    assert [s.file_system_snapshot_id for s in listed] == [snap_id]
    # Another principal sees nothing of it: not in its list, NOT_FOUND by id.
    theirs = cw.Sandbox.list_snapshots(auth=other_principal.bearer).result(timeout=RPC)
    assert snap_id not in {s.file_system_snapshot_id for s in theirs}
    with pytest.raises(cw.SnapshotNotFoundError):
        cw.Sandbox.get_snapshot(snap_id, auth=other_principal.bearer).result(timeout=RPC)
    with pytest.raises(cw.SnapshotNotFoundError):
        cw.Sandbox.delete_snapshot(snap_id, auth=other_principal.bearer).result(timeout=RPC)
    with pytest.raises(cw.CWSandboxError):
        cw.Sandbox.run(
            tags=[tag],
            auth=other_principal.bearer,
            file_system_snapshot=cw.FileSystemSnapshotOptions(
                mount_path="/workspace", file_system_snapshot_id=snap_id
            ),
        ).wait(timeout=RPC)
    restored = cw.Sandbox.run(
        tags=[tag],
        file_system_snapshot=cw.FileSystemSnapshotOptions(mount_path="/w", file_system_snapshot_id=snap_id),
    )
    with restored:
        assert run(restored, "cat", "/w/note").stdout == "kept\n"
    cw.Sandbox.delete_snapshot(snap_id).result(timeout=RPC)
    with pytest.raises(cw.SnapshotNotFoundError):
        cw.Sandbox.get_snapshot(snap_id).result(timeout=RPC)


def test_a_disk_volume_ends_in_enospc_at_its_size(cw, tag):
    with cw.Sandbox.run(tags=[tag], volumes=[scratch(cw, size="32Mi")]) as sb:
        r = run(sb, "sh", "-c", "dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1", check=False)
        assert r.returncode != 0
        assert "No space left on device" in r.stdout
        size = int(run(sb, "stat", "-c", "%s", "/workspace/fill").stdout)
        assert 16 << 20 < size <= 32 << 20
        # The root file system is not the volume: it is not full.
        run(sb, "sh", "-c", "echo ok > /tmp/ok")


def test_a_memory_volume_is_tmpfs_counted_against_the_sandboxs_memory(cw, tag):
    vols = [scratch(cw, size="1Gi", medium="MEMORY")]
    resources = {"limits": {"memory": "128Mi"}}
    with cw.Sandbox.run(tags=[tag], volumes=vols, resources=resources) as sb:
        assert run(sb, "sh", "-c", "grep ' /workspace ' /proc/mounts").stdout.split()[2] == "tmpfs"
        usage = lambda: int(read_cgroup(sb.sandbox_id, "memory", "memory.usage_in_bytes", "memory.current"))  # noqa: E731
        before = usage()
        run(sb, "sh", "-c", "head -c 64000000 /dev/zero > /workspace/small")
        # The volume's pages are the sandbox's memory, charged to its cgroup.
        assert usage() - before >= 60_000_000, (before, usage())


def test_a_registered_volume_is_shared_and_cannot_be_deleted_while_mounted(cw, tag):
    vid = f"shared-{tag[-6:]}"
    vol = cw.Volume.create(
        vid,
        pvc=cw.PvcVolumeSource(runner_id=socket.gethostname(), namespace="default", claim_name=vid),
        description="e2e",
    ).result(timeout=RPC)
    assert vol.state == cw.VolumeState.VALIDATING
    deadline = time.monotonic() + 60
    while vol.state == cw.VolumeState.VALIDATING and time.monotonic() < deadline:
        time.sleep(0.2)
        vol = cw.Volume.get(vid).result(timeout=RPC)
    assert vol.state == cw.VolumeState.READY, vol.state_reason
    assert vol.capacity and vol.access_modes == ("ReadWriteMany",)
    writer = cw.Sandbox.run(
        tags=[tag], volumes=[cw.RegisteredVolumeOptions(name="data", volume_id=vid, mount_path="/data")]
    )
    reader = cw.Sandbox.run(
        tags=[tag],
        volumes=[cw.RegisteredVolumeOptions(name="data", volume_id=vid, mount_path="/ro", read_only=True)],
    )
    try:
        run(writer, "sh", "-c", "echo from-writer > /data/shared.txt")
        assert run(reader, "cat", "/ro/shared.txt").stdout == "from-writer\n"
        denied = run(reader, "sh", "-c", "echo x > /ro/nope", check=False)
        assert denied.returncode != 0 and "Read-only" in denied.stderr
        assert cw.Volume.get(vid).result(timeout=RPC).attached_sandbox_count == 2
        with pytest.raises(cw.VolumeInUseError) as err:
            cw.Volume.get(vid).result(timeout=RPC).delete().result(timeout=RPC)
        assert writer.sandbox_id in str(err.value) and reader.sandbox_id in str(err.value)
    finally:
        writer.stop().result(timeout=RPC)
        reader.stop().result(timeout=RPC)
    # The data outlives the sandboxes.
    with cw.Sandbox.run(
        tags=[tag], volumes=[cw.RegisteredVolumeOptions(name="d", volume_id=vid, mount_path="/again")]
    ) as again:
        assert run(again, "cat", "/again/shared.txt").stdout == "from-writer\n"
    cw.Volume.get(vid).result(timeout=RPC).delete().result(timeout=RPC)
    with pytest.raises(cw.VolumeNotFoundError):
        cw.Volume.get(vid).result(timeout=RPC)


def test_concurrent_snapshots_and_a_snapshot_while_a_process_writes(cw, tag):
    with cw.Sandbox.run(tags=[tag], volumes=[scratch(cw, size="256Mi")]) as sb:
        # b trails a by at most one: a point-in-time copy never sees b ahead or far behind.
        sb.exec(
            [
                "sh",
                "-c",
                "i=0; while :; do i=$((i+1)); echo $i > /workspace/.a; mv /workspace/.a /workspace/a;"
                " echo $i > /workspace/.b; mv /workspace/.b /workspace/b; done",
            ]
        )
        time.sleep(0.5)
        ids: list[str] = []
        errors: list[BaseException] = []

        def take():
            try:
                ids.append(sb.snapshot().result(timeout=RPC))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=take) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(set(ids)) == 3
    for snap_id in ids:
        vols = [scratch(cw, restore_from_snapshot_id=snap_id)]
        with cw.Sandbox.run(tags=[tag], volumes=vols) as child:
            a, b = (int(run(child, "cat", f"/workspace/{n}").stdout) for n in "ab")
            assert a - b in (0, 1), (a, b)
            assert a > 0
        cw.Sandbox.delete_snapshot(snap_id).result(timeout=RPC)


def test_a_tampered_archive_is_refused_and_unreferenced_archives_are_collected(cw, tag, server: Server):
    before = blobs(server.data_dir)
    with cw.Sandbox.run(tags=[tag], volumes=[scratch(cw, size="64Mi")]) as sb:
        run(sb, "sh", "-c", f"echo {tag} > /workspace/unique; head -c 100000 /dev/urandom > /workspace/r")
        first = sb.snapshot().result(timeout=RPC)
        # Same contents, same archive: one blob for two records.
        second = sb.snapshot().result(timeout=RPC)
    new = blobs(server.data_dir) - before
    assert len(new) == 1, new
    blob = new.pop()
    cw.Sandbox.delete_snapshot(first).result(timeout=RPC)
    assert blob.exists(), "still named by the second snapshot"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    child = cw.Sandbox.run(tags=[tag], volumes=[scratch(cw, restore_from_snapshot_id=second)])
    with pytest.raises(cw.CWSandboxError) as err:
        child.wait(timeout=RPC)
    assert "digest" in str(err.value).lower() or "restore" in str(err.value).lower()
    child.stop(missing_ok=True).result(timeout=RPC)
    cw.Sandbox.delete_snapshot(second).result(timeout=RPC)
    assert not blob.exists(), "collected once no snapshot names it"


def test_unknown_snapshot_and_volume_give_the_clients_errors(cw, tag):
    with pytest.raises(cw.SnapshotNotFoundError):
        cw.Sandbox.get_snapshot("fss-000000000000").result(timeout=RPC)
    with pytest.raises(cw.SnapshotNotFoundError):
        vols = [scratch(cw, restore_from_snapshot_id="fss-000000000000")]
        cw.Sandbox.run(tags=[tag], volumes=vols).wait(timeout=RPC)
    with pytest.raises(cw.VolumeNotFoundError):
        vols = [cw.RegisteredVolumeOptions(name="v", volume_id="no-such", mount_path="/v")]
        cw.Sandbox.run(tags=[tag], volumes=vols).wait(timeout=RPC)
    # A sandbox with no scratch volume has nothing to snapshot.
    with cw.Sandbox.run(tags=[tag]) as plain:
        with pytest.raises(cw.CWSandboxError):
            plain.snapshot().result(timeout=RPC)


# --------------------------------------------------------------------------- kill -9 during a snapshot


@pytest.fixture
def own_daemon(binaries: Binaries, e2e_dirs: E2EDirs, principal_a: Principal, monkeypatch):
    root = e2e_dirs.root / "persistence"
    data_dir = root / "data"
    import_test_images(binaries, e2e_dirs.root, data_dir)
    config = root / "sandpitd.toml"
    # Beside the session daemon: no network of its own (that layout is taken).
    config.write_text("[network]\nenabled = false\n")
    baseline = set(mounts_under(root))
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data_dir,
        keys=[principal_a.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    srv.start()
    # The client's environment names the daemon (and wins over SandboxDefaults).
    monkeypatch.setenv("CWSANDBOX_BASE_URL", srv.url)
    yield srv
    sweep(srv, [principal_a])
    assert srv.stop() == 0
    leftover = [m for m in mounts_under(root) if m not in baseline]
    assert not leftover, leftover


def test_kill_9_during_a_snapshot_leaves_no_partial_snapshot(cw, own_daemon: Server, principal_a):
    defaults = cw.SandboxDefaults(base_url=own_daemon.url)
    sb = cw.Sandbox.run(
        defaults=defaults, auth=principal_a.bearer, volumes=[scratch(cw, size="1Gi")]
    )
    run(sb, "sh", "-c", "for i in $(seq 1 6); do head -c 40000000 /dev/urandom > /workspace/f$i; done")
    snap_id = sb.snapshot(wait_for_ready=False).result(timeout=RPC)
    time.sleep(0.2)
    own_daemon.kill9()
    own_daemon.start()
    snap = cw.Sandbox.get_snapshot(snap_id, base_url=own_daemon.url, auth=principal_a.bearer).result(timeout=RPC)
    if snap.status == cw.FileSystemSnapshotStatus.READY:
        pytest.fail("the snapshot finished before the kill: make the volume larger")
    assert snap.status == cw.FileSystemSnapshotStatus.FAILED
    assert "restarted" in snap.status_reason
    assert not blobs(own_daemon.data_dir), "no archive of it is kept"
    staging = own_daemon.data_dir / "snapshots" / "tmp"
    assert not any(staging.iterdir())
    # The sandbox survived the restart and can be snapshotted again.
    good = sb.snapshot().result(timeout=RPC)
    snap = cw.Sandbox.get_snapshot(good, base_url=own_daemon.url, auth=principal_a.bearer).result(timeout=RPC)
    assert snap.status == cw.FileSystemSnapshotStatus.READY
    assert len(blobs(own_daemon.data_dir)) == 1
    sb.stop().result(timeout=RPC)


# --------------------------------------------------------------------------- the S3 backend

S3_SERVER = Path(os.environ.get("SANDPIT_S3_SERVER", "/opt/s3s-fs/bin/s3s-fs"))


@pytest.fixture
def s3_daemon(binaries: Binaries, e2e_dirs: E2EDirs, principal_a: Principal, monkeypatch):
    """A daemon whose managed snapshots go to a real S3-compatible server (s3s-fs) on loopback."""
    if not S3_SERVER.is_file():
        pytest.skip(f"no S3 server at {S3_SERVER}: run scripts/install-s3-server.sh")
    root = e2e_dirs.root / "s3"
    objects = root / "objects"
    for bucket in ("managed", "byo"):
        (objects / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    s3 = subprocess.Popen(
        [str(S3_SERVER), "--host", "127.0.0.1", "--port", str(port),
         "--access-key", "e2ekey", "--secret-key", "e2esecret", str(objects)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "s3s-fs did not listen"
            time.sleep(0.05)
    secret = root / "s3-secret"
    secret.write_text("e2esecret\n")
    config = root / "sandpitd.toml"
    config.write_text(
        "[network]\nenabled = false\n"
        '[storage]\nsnapshot_backend = "s3"\n'
        f'[storage.s3]\nendpoint = "http://127.0.0.1:{port}"\nbucket = "managed"\n'
        f'access_key_id = "e2ekey"\nsecret_access_key_file = "{secret}"\nallow_http = true\n'
    )
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=root / "data",
        keys=[principal_a.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    import_test_images(binaries, e2e_dirs.root, srv.data_dir)
    srv.start()
    monkeypatch.setenv("CWSANDBOX_BASE_URL", srv.url)
    try:
        yield srv, objects
    finally:
        sweep(srv, [principal_a])
        code = srv.stop()
        s3.terminate()
        s3.wait()
        assert code == 0


def objects_in(bucket: Path) -> set[Path]:
    return {p for p in bucket.rglob("*") if p.is_file() and "sha256" in p.parts}


def test_snapshots_go_to_the_s3_bucket_and_to_a_principals_own_bucket(cw, s3_daemon, principal_a):
    srv, objects = s3_daemon
    kw = {"base_url": srv.url, "auth": principal_a.bearer}
    defaults = cw.SandboxDefaults(base_url=srv.url)
    config = cw.Sandbox.get_snapshot_bucket_config(**kw).result(timeout=RPC)
    assert config.effective_bucket_name == "managed"
    with cw.Sandbox.run(defaults=defaults, auth=principal_a.bearer, volumes=[scratch(cw)]) as sb:
        run(sb, "sh", "-c", "echo in-s3 > /workspace/f")
        managed_id = sb.snapshot().result(timeout=RPC)
        assert cw.Sandbox.get_snapshot(managed_id, **kw).result(timeout=RPC).object_bucket == "managed"
        assert len(objects_in(objects / "managed")) == 1
        assert not blobs(srv.data_dir), "nothing kept locally"
        cw.Sandbox.set_snapshot_bucket_config(bucket_name="byo", **kw).result(timeout=RPC)
        assert cw.Sandbox.get_snapshot_bucket_config(**kw).result(timeout=RPC).effective_bucket_name == "byo"
        run(sb, "sh", "-c", "echo in-byo > /workspace/f")
        byo_id = sb.snapshot().result(timeout=RPC)
        assert cw.Sandbox.get_snapshot(byo_id, **kw).result(timeout=RPC).object_bucket == "byo"
        assert len(objects_in(objects / "byo")) == 1
        with pytest.raises(cw.CWSandboxError):
            cw.Sandbox.set_snapshot_bucket_config(bucket_name="no-such-bucket", **kw).result(timeout=RPC)
    # Each restores from where it was written, whatever the principal chose since.
    for snap_id, text in ((managed_id, "in-s3\n"), (byo_id, "in-byo\n")):
        vols = [scratch(cw, restore_from_snapshot_id=snap_id)]
        with cw.Sandbox.run(defaults=defaults, auth=principal_a.bearer, volumes=vols) as child:
            assert run(child, "cat", "/workspace/f").stdout == text
        cw.Sandbox.delete_snapshot(snap_id, **kw).result(timeout=RPC)
    assert not objects_in(objects / "managed") and not objects_in(objects / "byo")
