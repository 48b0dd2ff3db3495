"""Issue 13 item 2: secrets as environment variables, through the real clients only.

The session daemon has two stores (secret_stores.py): `wandb`, a managed store filled
with `sandpit secret set` (the store the client's and the docs' examples name), and
`files`, a directory store. A secret reaches the main process and every exec; a bad
reference is refused with the reason and the field path, never the value; no value is
left in a response, the database, the daemon's log, the data dir or any argv.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import grpc
import pytest

from conftest import Server
from secret_stores import Stores

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 60

# Prints the environment of the sandbox's main process (`sleep`), found in /proc.
MAIN_ENV = (
    "import os\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
    "    except OSError:\n"
    "        continue\n"
    "    if argv[0] == b'sleep':\n"
    "        os.write(1, open(f'/proc/{pid}/environ', 'rb').read())\n"
    "        break\n"
)


def main_env(sb) -> dict[str, str]:
    r = sb.exec(["python3", "-c", MAIN_ENV]).result(timeout=RPC)
    assert r.returncode == 0, r.stderr
    return dict(kv.split("=", 1) for kv in r.stdout.split("\0") if kv)


def exec_env(sb, *names: str) -> dict[str, str]:
    script = "import json, os, sys; print(json.dumps({n: os.environ.get(n) for n in sys.argv[1:]}))"
    r = sb.exec(["python3", "-c", script, *names]).result(timeout=RPC)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_secrets_reach_the_main_process_and_every_exec(sdk, tag, stores: Stores):
    # The client's documented examples, plus a directory store with and without a field,
    # and a plain variable of a secret's name (the secret wins).
    sb = sdk.Sandbox.run(
        "sleep",
        "infinity",
        tags=[tag],
        environment_variables={"HF_TOKEN": "placeholder", "PLAIN": "kept"},
        secrets=[
            sdk.Secret(store="wandb", name="HF_TOKEN"),
            sdk.Secret(store="wandb", name="db-credentials", field="password", env_var="DB_PASS"),
            sdk.Secret(store="files", name="team/token", env_var="TEAM_TOKEN"),
            {"store": "files", "name": "service.json", "field": "api_key", "env_var": "API_KEY"},
        ],
    )
    sb.wait(timeout=RPC)
    want = {
        "HF_TOKEN": stores.hf_token,
        "DB_PASS": stores.db_password,
        "TEAM_TOKEN": stores.file_token,
        "API_KEY": stores.file_api_key,
        "PLAIN": "kept",
    }
    main = main_env(sb)
    assert {k: main.get(k) for k in want} == want
    assert exec_env(sb, *want) == want
    # A second exec, and one through the streaming path, see them too.
    assert exec_env(sb, "HF_TOKEN") == {"HF_TOKEN": stores.hf_token}
    r = sb.exec(["sh", "-c", 'printf %s "$DB_PASS"'], cwd="/tmp").result(timeout=RPC)
    assert r.stdout == stores.db_password
    sb.stop().result(timeout=RPC)


def _refused(sdk, tag, secret):
    with pytest.raises(sdk.SandboxError) as info:
        sdk.Sandbox.run("sleep", "infinity", tags=[tag], secrets=[secret])
    assert sdk.Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC) == []
    return info.value


FIELD = "sandbox.spec.containers[0].secret_stores[0].secrets[0]"


def test_an_unknown_store_is_a_failed_precondition(sdk, tag, stores: Stores):
    err = _refused(sdk, tag, sdk.Secret(store="vault", name="HF_TOKEN"))
    assert not isinstance(err, sdk.SandboxNotFoundError)
    assert err.reason == "CWSANDBOX_SECRET_STORE_NOT_FOUND"
    assert err.metadata["secret_store"] == "vault" and err.metadata["secret"] == "HF_TOKEN"
    assert FIELD in str(err) and '"vault"' in str(err), str(err)
    assert "FAILED_PRECONDITION" in repr(err.__cause__), repr(err.__cause__)


@pytest.mark.parametrize(
    "secret,words",
    [
        (dict(store="wandb", name="NO_SUCH"), ['secret "NO_SUCH" not found in store "wandb"']),
        (
            dict(store="wandb", name="db-credentials", field="token", env_var="T"),
            ['secret "db-credentials"', 'has no field "token"'],
        ),
        (dict(store="files", name="team/none", env_var="T"), ['"team/none" not found']),
    ],
    ids=["secret", "field", "file"],
)
def test_a_missing_secret_or_field_is_not_found(sdk, tag, stores: Stores, secret, words):
    err = _refused(sdk, tag, sdk.Secret(**secret))
    assert isinstance(err, sdk.SandboxNotFoundError), type(err)
    assert err.reason == "CWSANDBOX_SECRET_NOT_FOUND"
    assert err.metadata["secret_store"] == secret["store"]
    assert err.metadata["secret"] == secret["name"]
    for w in [FIELD, *words]:
        assert w in str(err), f"{w!r} not in {err}"
    assert stores.db_password not in str(err) and "app" not in str(err)


@pytest.mark.parametrize(
    "secret,field",
    [
        (dict(store="wandb", name="HF_TOKEN", env_var="1BAD"), f"{FIELD}.env_var"),
        (dict(store="wandb", name="db-credentials"), f"{FIELD}.env_var"),
        (dict(store="wandb", name="team/x", env_var="X"), FIELD),
        (dict(store="files", name="../etc/passwd", env_var="X"), f"{FIELD}.path"),
        (dict(store="a/b", name="X"), "sandbox.spec.containers[0].secret_stores[0].store_name"),
    ],
    ids=["env-var", "default-env-var", "managed-slash", "dotdot", "store-name"],
)
def test_bad_names_are_invalid(sdk, tag, secret, field):
    err = _refused(sdk, tag, sdk.Secret(**secret))
    assert isinstance(err, sdk.SandboxValidationError), type(err)
    assert err.reason == "CWSANDBOX_INVALID_REQUEST"
    assert [v.field for v in err.field_violations] == [field]


def test_the_cli_sets_lists_removes_and_rotates(tag, stores: Stores):
    from cwsandbox import Sandbox, Secret
    from cwsandbox.exceptions import SandboxNotFoundError

    value = f"cli-{secrets.token_hex(12)}"
    stores.set("CLI_TOKEN", value)
    # The value was only ever on stdin; never printed.
    listed = stores.cli("ls", "wandb")
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert {"HF_TOKEN", "db-credentials", "CLI_TOKEN"} <= set(names)
    assert value not in listed.stdout + listed.stderr

    def read():
        sb = Sandbox.run("sleep", "infinity", tags=[tag], secrets=[Secret(store="wandb", name="CLI_TOKEN")])
        try:
            return exec_env(sb, "CLI_TOKEN")["CLI_TOKEN"]
        finally:
            sb.stop().result(timeout=RPC)

    assert read() == value
    key_before = stores.key_file.read_bytes()
    files_before = {p.name: p.read_bytes() for p in stores.managed_dir.glob("*.secret")}
    rotated = stores.cli("rotate-key", "wandb")
    assert rotated.returncode == 0, rotated.stderr
    assert f"re-encrypted {len(files_before)} secrets" in rotated.stdout
    key_after = stores.key_file.read_bytes()
    assert key_after != key_before and len(key_after) == 32
    assert stat.S_IMODE(stores.key_file.stat().st_mode) == 0o600
    for p in stores.managed_dir.glob("*.secret"):
        assert p.read_bytes() != files_before[p.name], p.name
    # The running daemon reads the new key without a restart.
    assert read() == value

    removed = stores.cli("rm", "wandb", "CLI_TOKEN")
    assert removed.returncode == 0, removed.stderr
    assert "CLI_TOKEN" not in stores.cli("ls", "wandb").stdout.split()
    with pytest.raises(SandboxNotFoundError):
        read()
    again = stores.cli("rm", "wandb", "CLI_TOKEN")
    assert again.returncode != 0 and "no secret" in again.stderr
    # A directory store is not the CLI's to fill; an unknown store is named.
    for store in ["files", "nope"]:
        proc = stores.cli("set", store, "X", stdin="v\n")
        assert proc.returncode != 0 and store in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- leaks


def _files_under(root: Path):
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if stat.S_ISREG(path.lstat().st_mode):
                    yield path
            except OSError:
                continue


def _file_holds(needle: bytes, path: Path) -> bool:
    """Whether `path` holds `needle`, reading only its data: the writable layers'
    disk images (and the disk pool's) are sparse files of 10 GiB."""
    chunk = 1 << 20
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return False
            end = os.lseek(fd, start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                # Overlapping reads: a match across two chunks is still found.
                data = os.pread(fd, min(chunk, end - pos) + len(needle) - 1, pos)
                if needle in data:
                    return True
                pos += chunk
            off = end
    return False


def _holding(needle: bytes, paths) -> list[str]:
    found = []
    for path in paths:
        try:
            if _file_holds(needle, path):
                found.append(str(path))
        except OSError:
            continue
    return found


def _raw_responses(server: Server, key: str, sandbox_id: str) -> list[bytes]:
    """GetSandbox and ListSandboxes as they come off the wire (the client's own stubs)."""
    from cwsandbox._proto import sandbox_pb2, sandbox_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        md = (("authorization", f"Bearer {key}"),)
        got = stub.GetSandbox(sandbox_pb2.GetSandboxRequest(sandbox_id=sandbox_id), metadata=md)
        listed = stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(show_terminated=True), metadata=md
        )
    return [got.SerializeToString(), listed.SerializeToString()]


def _raw_error(server: Server, key: str, spec) -> bytes:
    """A refused CreateSandbox's status: code, message and every trailer."""
    from cwsandbox._proto import sandbox_pb2, sandbox_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(spec=spec)),
                metadata=(("authorization", f"Bearer {key}"),),
            )
    e = info.value
    parts = [str(e.code()).encode(), (e.details() or "").encode()]
    for k, v in e.trailing_metadata() or ():
        parts.append(v if isinstance(v, bytes) else str(v).encode())
    return b"\n".join(parts)


def test_no_value_is_left_anywhere(tag, server: Server, stores: Stores, principal_a, e2e_dirs):
    from cwsandbox import Sandbox, Secret
    from cwsandbox._proto import sandbox_pb2

    value = f"leak-{secrets.token_hex(16)}"
    needle = value.encode()
    stores.set("LEAK_TOKEN", value)
    stores.set("leak-json", json.dumps({"token": value, "other": "x"}))
    sb = Sandbox.run(
        "sleep",
        "infinity",
        tags=[tag],
        secrets=[
            Secret(store="wandb", name="LEAK_TOKEN"),
            Secret(store="wandb", name="leak-json", field="token", env_var="LEAK_FIELD"),
        ],
    )
    sb.wait(timeout=RPC)
    assert exec_env(sb, "LEAK_TOKEN", "LEAK_FIELD") == {"LEAK_TOKEN": value, "LEAK_FIELD": value}

    # No argv of any process, and no environment outside the sandbox, holds it.
    argv_holders, env_holders = [], []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                argv_holders.append(proc.name)
            if needle in (proc / "environ").read_bytes():
                env_holders.append((proc.name, (proc / "cgroup").read_text()))
        except OSError:
            continue
    assert argv_holders == [], f"argv of {argv_holders} holds the value"
    assert env_holders, "the sandbox's main process should hold it in its environment"
    for pid, cgroup in env_holders:
        assert sb.sandbox_id in cgroup, f"pid {pid} outside the sandbox holds it: {cgroup}"

    # Responses and errors (a field of a secret that is not JSON; a missing field of one
    # whose other member is the value).
    blobs = _raw_responses(server, principal_a.key, sb.sandbox_id)
    for bad in [
        sandbox_pb2.SecretMapping(path="LEAK_TOKEN", field="token", env_var="X"),
        sandbox_pb2.SecretMapping(path="leak-json", field="nope", env_var="X"),
    ]:
        spec = sandbox_pb2.SandboxSpec(
            containers=[
                sandbox_pb2.Container(
                    name="main",
                    image="python:3.11",
                    secret_stores=[
                        sandbox_pb2.SecretStoreReference(store_name="wandb", secrets=[bad])
                    ],
                )
            ]
        )
        blobs.append(_raw_error(server, principal_a.key, spec))
    for blob in blobs:
        assert needle not in blob
    listed = Sandbox.list(tags=[tag], show_terminated=True).result(timeout=RPC)
    assert [b.sandbox_id for b in listed] == [sb.sandbox_id]
    assert value not in repr(listed[0].__dict__)

    def disk_holders() -> list[str]:
        files = list(_files_under(server.data_dir)) + [e2e_dirs.log_path]
        return _holding(needle, files)

    # While it runs, and once it is stopped (records written, log flushed).
    assert disk_holders() == [], "the value is on disk in clear"
    sb.stop().result(timeout=RPC)
    assert _raw_responses(server, principal_a.key, sb.sandbox_id)[0].find(needle) == -1
    assert disk_holders() == [], "the value is on disk in clear"
    # The store holds it, sealed.
    assert (stores.managed_dir / "LEAK_TOKEN.secret").is_file()
    for name in ["LEAK_TOKEN", "leak-json"]:
        assert stores.cli("rm", "wandb", name).returncode == 0
