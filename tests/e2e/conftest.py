"""End-to-end harness: a real `sandpitd`, driven only through the real clients.

One daemon per test session (`server` fixture), on a free loopback port, with a
fresh data dir whose image store holds `python:3.11` (plus the alias
`python:3.15` that a docs snippet asks for), both imported once from the
mmdebstrap rootfs with the docs' fixtures baked into /workspace (see README.md).

Two principals: A (the default for every client call, via the environment) and
B (for isolation tests, passed explicitly with the client's `auth=`).

At the end of the session every sandbox still running is stopped through the
client, the daemon gets SIGTERM, and the harness asserts that nothing leaked:
no new process in a `/sandpit/` cgroup, no mount under the data dir.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import secret_stores

REPO_ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
FIXTURE_WORKSPACE = E2E_DIR / "fixtures" / "workspace"
# The image's working directory; the docs' fixtures (train.py, might_fail.py) live there.
IMAGE_WORKDIR = "/workspace"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
IMAGE_CMD = ["python3"]
# python:3.11 is what the clients default to; python:3.15 is named by a docs snippet
# (001, "To use a different image"). No registry is reachable, so both are local imports.
IMAGE_REFERENCES = ["python:3.11", "python:3.15"]

# The daemon's unary ReadFile/WriteFile limit in these tests (default 32 MiB): lower, so
# that a 20 MiB file exercises the client's streaming fallback in both directions.
MAX_FILE_BYTES = 16 << 20
# The data dir reserve of every test daemon whose config sets none (Server._pin_disk_reserve).
TEST_DISK_RESERVE = "1Gi"

BUILD_HINT = "run `cargo build --release --bins` first (scripts/test.sh does)"

_SERVER: Server | None = None  # for the report hook below


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    sandpitd: Path
    sandpit: Path


def _find_binary(env: str, name: str) -> Path:
    value = os.environ.get(env)
    path = Path(value) if value else REPO_ROOT / "target" / "release" / name
    if not path.is_file() or not os.access(path, os.X_OK):
        where = f"${env}={value}" if value else str(path)
        pytest.fail(f"{name} binary not found at {where}: {BUILD_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    return Binaries(
        sandpitd=_find_binary("SANDPITD_BIN", "sandpitd"),
        sandpit=_find_binary("SANDPIT_BIN", "sandpit"),
    )


# --------------------------------------------------------------------------- keys / principals


@dataclass(frozen=True)
class Principal:
    name: str
    key: str

    @property
    def bearer(self):
        """The client's explicit auth for this principal (`authorization: Bearer KEY`)."""
        from cwsandbox import AuthHeaders

        return AuthHeaders(headers={"authorization": f"Bearer {self.key}"}, strategy="api_key")

    @property
    def wandb_header(self):
        """The header wandb.sandbox sends (`x-wandb-api-key: KEY`), as explicit auth."""
        from cwsandbox import AuthHeaders

        return AuthHeaders(headers={"x-wandb-api-key": self.key}, strategy="wandb_api_key")


def _new_key(label: str) -> str:
    # wandb validates key syntax before sending it: 40+ word characters, no dash.
    return f"sandpite2e{label}{secrets.token_hex(24)}"


@pytest.fixture(scope="session")
def principal_a() -> Principal:
    return Principal("a", _new_key("a"))


@pytest.fixture(scope="session")
def principal_b() -> Principal:
    return Principal("b", _new_key("b"))


@pytest.fixture
def other_principal(principal_b: Principal) -> Principal:
    """A second principal: its sandboxes and ours must be invisible to each other."""
    return principal_b


# --------------------------------------------------------------------------- data dir + images


@dataclass
class E2EDirs:
    root: Path
    data_dir: Path
    log_path: Path
    keep: bool = False


@pytest.fixture(scope="session")
def e2e_dirs() -> Iterator[E2EDirs]:
    # Short path on purpose: the engine binds <data-dir>/.../<sandbox-id>/agent.sock
    # and Unix socket paths are limited to 107 bytes.
    base = os.environ.get("SANDPIT_E2E_TMP", "/tmp")
    root = Path(tempfile.mkdtemp(prefix="spe2e-", dir=base))
    dirs = E2EDirs(root=root, data_dir=root / "data", log_path=root / "sandpitd.log")
    dirs.data_dir.mkdir()
    yield dirs
    if os.environ.get("SANDPIT_E2E_KEEP") or dirs.keep:
        print(f"\nsandpit e2e: kept {root}", file=sys.stderr)
        return
    shutil.rmtree(root, ignore_errors=True)


def _rootfs_tar() -> Path:
    value = os.environ.get("SANDPIT_E2E_ROOTFS_TAR")
    path = Path(value) if value else REPO_ROOT / ".cache" / "images" / "python311.tar"
    if not path.is_file():
        pytest.fail(
            f"rootfs tarball {path} missing: run scripts/build-test-images.sh", pytrace=False
        )
    return path


def build_test_rootfs(src: Path, dest: Path, workspace: Path = FIXTURE_WORKSPACE) -> None:
    """dest = src with every file under `workspace` appended at .{IMAGE_WORKDIR}/."""
    shutil.copyfile(src, dest)
    now = int(time.time())
    with tarfile.open(dest, mode="a", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(workspace.rglob("*")):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(f".{IMAGE_WORKDIR}/{path.relative_to(workspace).as_posix()}")
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = now
            with path.open("rb") as f:
                tar.addfile(info, f)


def import_test_images(binaries: Binaries, scratch: Path, data_dir: Path) -> Path:
    """Fills `data_dir`'s image store with the test images (via `scratch` for the tarball)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tar_path = scratch / "python311-e2e.tar"
    build_test_rootfs(_rootfs_tar(), tar_path)
    for reference in IMAGE_REFERENCES:
        cmd = [
            str(binaries.sandpit),
            "--data-dir",
            str(data_dir),
            "image",
            "import",
            reference,
            str(tar_path),
            *[a for e in IMAGE_ENV for a in ("--env", e)],
            "--workdir",
            IMAGE_WORKDIR,
            "--cmd",
            *IMAGE_CMD,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(
                f"image import failed ({proc.returncode}): {' '.join(cmd)}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}",
                pytrace=False,
            )
    tar_path.unlink()
    return data_dir


@pytest.fixture(scope="session")
def data_dir(e2e_dirs: E2EDirs, binaries: Binaries) -> Path:
    """The daemon's data dir, its image store pre-filled with the test images."""
    return import_test_images(binaries, e2e_dirs.root, e2e_dirs.data_dir)


# --------------------------------------------------------------------------- leak probes


def cgroup_procs(names: list[str]) -> dict[int, str]:
    """pid -> cgroup path of every process in a cgroup whose path has one of `names` as a
    component."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if any(f"/{n}/" in path + "/" for n in names):
                found[int(entry.name)] = path
                break
    return found


def sandpit_cgroup_procs() -> dict[int, str]:
    """pid -> cgroup path, for every process in a cgroup under `/sandpit/`."""
    return cgroup_procs(["sandpit"])


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def mounts_under(path: Path) -> list[str]:
    """Lines of /proc/self/mountinfo whose mount point or source lies under `path`."""
    prefix = str(path)
    # Mount point, root and super options (overlay lowerdir=/upperdir=) all count.
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if prefix in line]


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerError(AssertionError):
    pass


@dataclass
class Server:
    """A `sandpitd` subprocess on a fixed loopback port and data dir."""

    binary: Path
    data_dir: Path
    keys: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    startup_timeout: float = 60.0
    config: Path | None = None
    proc: subprocess.Popen | None = None
    starts: int = 0
    # The secret stores its config names (secret_stores.py), filled before the start.
    stores: secret_stores.Stores | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
        ]
        for key in self.keys:
            argv += ["--api-key", key]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def label(self) -> str:
        """What messages and log banners call it (the cluster's daemons: their names)."""
        return "sandpitd"

    def accepting(self) -> bool:
        return _port_open(self.port)

    def _fail(self, message: str) -> ServerError:
        return ServerError(f"{message}\n--- {self.label} log (tail) ---\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _pin_disk_reserve(self) -> None:
        """Pins the data dir's reserve at TEST_DISK_RESERVE unless the config sets one.

        The default ("auto", 5% of the disk: 12.6 GiB of a 252 GiB disk) would refuse
        every create on a CI host whose shared disk has less free, failing tests that
        are about something else. The reserve itself has its own test
        (test_tenant_limits.py), which sets it."""
        if self.config is None:
            return
        text = self.config.read_text()
        if re.search(r"^\s*data_dir_reserve\s*=", text, re.M):
            return
        line = f'data_dir_reserve = "{TEST_DISK_RESERVE}"\n'
        header = re.search(r"^\[limits\][ \t]*(\n|\Z)", text, re.M)
        if header:
            head = text[: header.end()]
            text = head + ("" if head.endswith("\n") else "\n") + line + text[header.end() :]
        else:
            text = text.rstrip("\n") + "\n[limits]\n" + line
        self.config.write_text(text)

    def start(self) -> None:
        assert not self.alive(), f"{self.label} already running"
        self.starts += 1
        self._pin_disk_reserve()
        banner = "" if self.label == "sandpitd" else f"{self.label} "
        with self.log_path.open("ab") as log:
            log.write(f"\n===== e2e harness: {banner}start #{self.starts}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "RUST_BACKTRACE": "1"},
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"{self.label} exited with {self.proc.returncode} during start-up")
            if self.accepting():
                return
            time.sleep(0.05)
        self.kill9()
        raise self._fail(f"{self.label} did not accept connections on {self.url} within {self.startup_timeout}s")

    def _wait_port_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.accepting():
                return
            time.sleep(0.05)
        raise self._fail(
            f"{self.url} still accepts connections after {self.label} exited: "
            "its listening socket leaked into a child process?"
        )

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the daemon only, never its process group) and wait; returns its exit status."""
        assert self.proc is not None, "sandpitd never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise self._fail(f"sandpitd did not exit within {timeout}s of SIGTERM") from None
        self._wait_port_closed()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon process alone (like `kill -9 PID`): sandboxes must survive it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._wait_port_closed()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with kill=True) and start again on the same port and data dir."""
        if kill:
            self.kill9()
        else:
            code = self.stop()
            if code != 0:
                raise self._fail(f"sandpitd exited with {code} on SIGTERM (expected 0)")
        self.start()

    def ensure_running(self) -> None:
        if not self.alive():
            self.start()


# --------------------------------------------------------------------------- client-side sweeps


def sweep(server: Server, principals: list[Principal], tags: list[str] | None = None) -> list[str]:
    """Stops, through the client, every active sandbox of `principals` (with `tags`)."""
    from cwsandbox import Sandbox

    stopped: list[str] = []
    errors: list[str] = []
    for principal in principals:
        try:
            boxes = Sandbox.list(
                tags=tags, base_url=server.url, auth=principal.bearer, timeout_seconds=30
            ).result(timeout=60)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"list as {principal.name}: {type(e).__name__}: {e}")
            continue
        refs = []
        for box in boxes:
            try:
                refs.append((box, box.stop(graceful_shutdown_seconds=1, missing_ok=True)))
            except Exception as e:  # noqa: BLE001
                errors.append(f"stop {box.sandbox_id}: {type(e).__name__}: {e}")
        for box, ref in refs:
            try:
                ref.result(timeout=60)
                stopped.append(box.sandbox_id)
            except Exception as e:  # noqa: BLE001
                errors.append(f"stop {box.sandbox_id}: {type(e).__name__}: {e}")
    if errors:
        raise AssertionError("sweep failed:\n" + "\n".join(errors))
    return stopped


def all_sandbox_ids(server: Server, principals: list[Principal]) -> set[str]:
    """Ids of every sandbox the daemon still knows for `principals`, terminal ones included."""
    from cwsandbox import Sandbox

    found: set[str] = set()
    for principal in principals:
        boxes = Sandbox.list(
            base_url=server.url, auth=principal.bearer, show_terminated=True, timeout_seconds=30
        ).result(timeout=60)
        found.update(b.sandbox_id for b in boxes)
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def server(
    binaries: Binaries,
    data_dir: Path,
    e2e_dirs: E2EDirs,
    principal_a: Principal,
    principal_b: Principal,
) -> Iterator[Server]:
    global _SERVER
    baseline_procs = set(sandpit_cgroup_procs())
    baseline_mounts = set(mounts_under(e2e_dirs.root))
    config = e2e_dirs.root / "sandpitd.toml"
    metrics_port = free_port()
    config.write_text(
        f"max_file_bytes = {MAX_FILE_BYTES}\n"
        + secret_stores.config_toml(e2e_dirs.root, data_dir)
        # Sandboxes get the default network (egress denied); no name is resolved for
        # them, so nothing is ever asked of the host's resolvers. The networking tests
        # run a daemon of their own (test_network.py).
        + "[network]\nupstream_dns = []\n"
        # Not the default port: a developer's daemon on this host may hold it.
        + f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data_dir,
        keys=[principal_a.key, principal_b.key],
        log_path=e2e_dirs.log_path,
        config=config,
        stores=secret_stores.fill(binaries.sandpit, config, e2e_dirs.root, data_dir),
    )
    srv.metrics_port = metrics_port  # type: ignore[attr-defined]
    srv.start()
    _SERVER = srv
    yield srv

    problems: list[str] = []
    if not srv.alive():
        code = srv.proc.returncode if srv.proc else None
        problems.append(f"sandpitd was not running at the end of the session (exit status {code})")
        try:
            srv.start()  # to stop what is left through the API
        except ServerError as e:
            problems.append(f"restart for the final sweep failed: {e}")
    our_ids: set[str] | None = None
    if srv.alive():
        try:
            sweep(srv, [principal_a, principal_b])
        except AssertionError as e:
            problems.append(str(e))
        try:
            our_ids = all_sandbox_ids(srv, [principal_a, principal_b])
        except Exception as e:  # noqa: BLE001 - then every new /sandpit/ process counts
            problems.append(f"listing every sandbox for the leak check failed: {e}")
        try:
            code = srv.stop()
            if code != 0:
                problems.append(f"sandpitd exited with {code} on SIGTERM (expected 0)")
        except ServerError as e:
            problems.append(str(e))

    def ours(cgroup: str) -> bool:
        # Another daemon on the same host (a developer's) has its own sandboxes in
        # /sandpit/ too: count only cgroups named after our sandboxes when we know them.
        if our_ids is None:
            return True
        return any(part in our_ids for part in cgroup.split("/"))

    leaked: dict[int, str] = {}
    deadline = time.monotonic() + 15
    while True:
        leaked = {
            p: c
            for p, c in sandpit_cgroup_procs().items()
            if p not in baseline_procs and ours(c)
        }
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leaked:
        problems.append(
            "processes left in sandpit cgroups after every sandbox was stopped:\n"
            + "\n".join(f"  pid {p} in {c}: {_cmdline(p)}" for p, c in sorted(leaked.items()))
        )
    mounts = [m for m in mounts_under(e2e_dirs.root) if m not in baseline_mounts]
    if mounts:
        problems.append("mounts left under the data dir:\n" + "\n".join(f"  {m}" for m in mounts))
    _SERVER = None
    if not problems:
        # The daemon's host side of the network (its nftables table and gateway
        # link) outlives it by design; nothing of a sandbox may (no sp- link).
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        left = [l.split(":")[1].strip() for l in links.splitlines() if l.split(":")[1].strip().startswith("sp-")]
        if left:
            problems.append(f"sandbox links left on the host: {left}")
        else:
            subprocess.run(["nft", "delete", "table", "inet", "sandpit"], check=False)
            subprocess.run(["ip", "link", "del", "sandpit0"], check=False)
    if problems:
        e2e_dirs.keep = True  # keep the data dir and log to look at
        raise AssertionError(
            "\n\n".join(problems) + f"\n--- sandpitd log (tail) ---\n{srv.log_tail(80)}"
        )


def _client_env_values(server: Server, principal: Principal, root: Path) -> dict[str, str]:
    wandb_dir = root / "wandb"
    wandb_dir.mkdir(exist_ok=True)
    return {
        "CWSANDBOX_BASE_URL": server.url,
        "CWSANDBOX_API_KEY": principal.key,
        # wandb.sandbox installs W&B auth process-wide: it sends `x-wandb-api-key` with
        # the key wandb resolves (WANDB_API_KEY first). The sandbox URL still comes from
        # CWSANDBOX_BASE_URL; WANDB_BASE_URL only names the W&B host (left at its default,
        # so no x-wandb-host header is added). Nothing contacts W&B: the key is not verified.
        "WANDB_API_KEY": principal.key,
        "WANDB_DIR": str(wandb_dir),
        "WANDB_CONFIG_DIR": str(wandb_dir / "config"),
        "WANDB_CACHE_DIR": str(wandb_dir / "cache"),
        "WANDB_DATA_DIR": str(wandb_dir / "data"),
        "WANDB_SILENT": "true",
    }


@pytest.fixture
def stores(server: Server) -> secret_stores.Stores:
    """The session daemon's secret stores and the values in them."""
    assert server.stores is not None
    return server.stores


@pytest.fixture
def client_env(
    server: Server, principal_a: Principal, e2e_dirs: E2EDirs, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Points both clients at the daemon as principal A; returns the variables set."""
    values = _client_env_values(server, principal_a, e2e_dirs.root)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def snippet_env(server: Server, principal_a: Principal, e2e_dirs: E2EDirs) -> dict[str, str]:
    """The client variables (principal A) for a subprocess, e.g. a docs snippet."""
    return _client_env_values(server, principal_a, e2e_dirs.root)


@pytest.fixture(params=["cwsandbox", "wandb.sandbox"])
def sdk(request: pytest.FixtureRequest, client_env: dict[str, str]):
    """The client API as users import it: `cwsandbox` or `wandb.sandbox`.

    Importing wandb.sandbox switches cwsandbox's process-global auth mode to W&B
    (`x-wandb-api-key`); each test gets the mode of the API it imports, so both
    auth headers are exercised whatever the test order.
    """
    with client_api(request.param) as module:
        yield module


@contextmanager
def client_api(name: str) -> Iterator:
    """`cwsandbox` or `wandb.sandbox`, with the auth mode that import path installs."""
    import cwsandbox._auth

    if name == "wandb.sandbox":
        import wandb.sandbox as module
        import wandb.sandbox._auth as wandb_auth

        wandb_auth._set_wandb_auth_mode()
    else:
        import cwsandbox as module

        cwsandbox._auth._reset_auth_mode_for_testing()
    try:
        yield module
    finally:
        cwsandbox._auth._reset_auth_mode_for_testing()


@pytest.fixture(autouse=True)
def _builtin_auth_mode() -> Iterator[None]:
    """Every test starts with cwsandbox's own auth (Bearer); `sdk` switches per import path."""
    import cwsandbox._auth

    cwsandbox._auth._reset_auth_mode_for_testing()
    yield
    cwsandbox._auth._reset_auth_mode_for_testing()


@pytest.fixture
def tag(request: pytest.FixtureRequest, server: Server, principal_a: Principal) -> Iterator[str]:
    """A tag unique to this test; its active sandboxes are stopped after the test."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    value = f"e2e-{name}-{secrets.token_hex(3)}"
    yield value
    if server.alive():
        sweep(server, [principal_a], tags=[value])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVER is not None:
        report.sections.append(("sandpitd log (tail)", _SERVER.log_tail(60)))
