"""Issue 14 item 4: checkpoint and fork. `sandpit commit` (the `sandpit.v1`
CheckpointService, from Python through `clients/python/sandpit_ext` and from the
CLI) stores a running sandbox's root file system as an image; sandboxes start from it
with the unmodified client (`container_image="NAME:TAG"`).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import REPO_ROOT, Binaries, Principal, Server

sys.path.insert(0, str(REPO_ROOT / "clients" / "python"))
import sandpit_ext  # noqa: E402

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120
CHILDREN = 10


def run(sb, *argv, check=True):
    r = sb.exec(list(argv)).result(timeout=RPC)
    if check:
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r


def test_commit_then_ten_children_each_see_the_parent_and_not_each_other(
    tag, server: Server, principal_a: Principal, other_principal: Principal
):
    from cwsandbox import CWSandboxError, Sandbox

    image = f"fork-{tag[-12:]}:v1"
    parent = Sandbox.run(tags=[tag])
    try:
        run(parent, "sh", "-c", "set -e; echo from-parent > /opt/parent.txt; mkdir -p /srv/tree/a;"
            " head -c 1000000 /dev/urandom > /srv/tree/a/blob; sha256sum /srv/tree/a/blob > /srv/sum;"
            " rm /etc/debian_version; ln -s /opt/parent.txt /srv/link")
        result = sandpit_ext.commit(parent.sandbox_id, image, base_url=server.url, api_key=principal_a.key)
        assert result.image == f"docker.io/library/{image}" or result.image == image
        assert result.layer_digest.startswith("sha256:") and result.image_id.startswith("sha256:")
        assert result.files >= 5 and result.layer_size_bytes >= 1_000_000
        # The parent goes on after the checkpoint (it was frozen only while copying).
        run(parent, "sh", "-c", "echo after > /opt/after.txt")

        def child(i: int):
            sb = Sandbox.run(tags=[tag], container_image=image)
            run(sb, "sh", "-c", f"echo child-{i} > /opt/child-{i}")
            return sb

        with concurrent.futures.ThreadPoolExecutor(CHILDREN) as pool:
            children = list(pool.map(child, range(CHILDREN)))
        try:
            for i, sb in enumerate(children):
                assert run(sb, "cat", "/opt/parent.txt").stdout == "from-parent\n"
                run(sb, "sh", "-c", "cd /srv && sha256sum -c sum")
                assert run(sb, "readlink", "/srv/link").stdout.strip() == "/opt/parent.txt"
                # The parent's deletion is in the checkpoint (a whiteout), its later write is not.
                assert run(sb, "test", "-e", "/etc/debian_version", check=False).returncode == 1
                assert run(sb, "test", "-e", "/opt/after.txt", check=False).returncode == 1
                mine = run(sb, "sh", "-c", "ls /opt | grep child- || true").stdout.split()
                assert mine == [f"child-{i}"], mine
        finally:
            for sb in children:
                sb.stop().result(timeout=RPC)
        assert run(parent, "sh", "-c", "ls /opt | grep -c child- || true").stdout.strip() == "0"
    finally:
        parent.stop().result(timeout=RPC)
    # Another principal's NAME:TAG is not this commit: nothing local, and the pull fails.
    other = Sandbox.run(tags=[tag], container_image=image, auth=other_principal.bearer)
    with pytest.raises(CWSandboxError):
        other.wait(timeout=RPC)
    other.stop(missing_ok=True).result(timeout=RPC)


def test_commit_refusals_say_what_went_wrong(tag, server: Server, principal_a: Principal, other_principal: Principal):
    from cwsandbox import Sandbox

    kw = {"base_url": server.url, "api_key": principal_a.key}
    with pytest.raises(grpc.RpcError) as err:
        sandpit_ext.commit("0123456789ab", "x:v1", **kw)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with Sandbox.run(tags=[tag]) as sb:
        with pytest.raises(grpc.RpcError) as err:
            sandpit_ext.commit(sb.sandbox_id, "Not A Name", **kw)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Someone else's sandbox is not found, exactly like an unknown one.
        with pytest.raises(grpc.RpcError) as err:
            sandpit_ext.commit(sb.sandbox_id, "x:v1", base_url=server.url, api_key=other_principal.key)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        sandpit_ext.commit(sb.sandbox_id, "x:v1", **kw)
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_the_cli_commits_too(tag, binaries: Binaries, server: Server, principal_a: Principal):
    from cwsandbox import Sandbox

    image = f"cli-{tag[-12:]}:v2"
    with Sandbox.run(tags=[tag]) as sb:
        run(sb, "sh", "-c", "echo cli > /opt/cli.txt")
        out = subprocess.run(
            [str(binaries.sandpit), "--server", server.url, "--api-key", principal_a.key,
             "commit", sb.sandbox_id, image, "--json"],
            capture_output=True, text=True, timeout=RPC,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["sandbox_id"] == sb.sandbox_id and doc["layer_digest"].startswith("sha256:")
    with Sandbox.run(tags=[tag], container_image=image) as child:
        assert run(child, "cat", "/opt/cli.txt").stdout == "cli\n"


def test_the_python_module_encodes_what_the_proto_declares():
    proto = (REPO_ROOT / "proto" / "sandpit" / "v1" / "checkpoint.proto").read_text()
    for field in ("string sandbox_id = 1", "string image = 2", "string request_id = 3",
                  "string image_id = 2", "string layer_digest = 3", "uint64 layer_size_bytes = 4",
                  "uint64 files = 5", "uint64 duration_ms = 6"):
        assert field in proto, field
    encoded = sandpit_ext._encode_request("abc", "n:t", "")
    assert encoded == b"\x0a\x03abc\x12\x03n:t"
    r = sandpit_ext._decode_response(b"\x0a\x01i\x12\x02id\x1a\x01d\x20\x96\x01\x28\x05\x30\x07")
    assert r == sandpit_ext.CommitResult("i", "id", "d", 150, 5, 7)
    assert Path(sandpit_ext.__file__).is_file()
