"""The pieces of the multi-runner topology (issue 18), each with its own cleanup.

- `Netns`: a network namespace joined to the host by a veth pair
  (host side 10.231.N.1/24, namespace side 10.231.N.2/24, lo up inside).
- `Postgres`: a throwaway PostgreSQL run as the `postgres` user (initdb in a temp
  dir chowned to it, trust auth for 127.0.0.1/32 and 10.231.0.0/16 only), on
  loopback and the host ends of the veths; `crash_restart()` is SIGQUIT (an
  immediate shutdown, as a crash) and a start on the same data dir and port.
- `Daemon`: `sandpitd` as a runner (started inside its namespace with
  `nsenter --net=/run/netns/NAME`, not `ip netns exec`, which remounts /sys and
  hides /sys/fs/cgroup) or as a gateway (host loopback). It is the e2e harness's
  `Server` with another argv and a readiness check on its own address.
- `Balancer`: a small L4 TCP balancer on loopback in front of the gateways (what a
  Kubernetes Service would be): round-robin per new connection, skipping a
  backend that refuses; it knows which backend each live connection goes to and
  how many bytes came back on it.

Nothing here imports the client: `cluster.py` and the tests do.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import conftest as e2e  # tests/e2e/conftest.py, imported by pytest under this name

assert Path(e2e.__file__).resolve() == Path(__file__).resolve().parents[1] / "conftest.py", (
    f"`conftest` is {e2e.__file__}, not tests/e2e/conftest.py"
)

PG_BIN = Path(os.environ.get("SANDPIT_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUBNET = "10.231"  # 10.231.N.0/24 per runner namespace
RUNNER_PORT = 50051


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- network namespaces


def stale_namespaces() -> list[str]:
    """`spc-*` namespaces left by an earlier run (the e2e lock makes runs exclusive)."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("spc-")]


def remove_stale_namespaces() -> list[str]:
    """Deletes stale `spc-*` namespaces that no process is in; returns those still in use."""
    busy = []
    for name in stale_namespaces():
        if sh("ip", "netns", "pids", name, check=False).stdout.strip():
            busy.append(name)
        else:
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if re.fullmatch(r"spch\d[0-9a-f]+", link):
                sh("ip", "link", "del", link, check=False)
    if not busy:
        for lock in Path("/run/sandpit").glob("network-spc_r[0-9]_*.lock"):
            lock.unlink(missing_ok=True)
    return busy


@dataclass
class Netns:
    index: int
    suffix: str
    created: bool = False

    @property
    def name(self) -> str:
        return f"spc-r{self.index}-{self.suffix}"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def host_link(self) -> str:
        return f"spch{self.index}{self.suffix}"  # <= 15 characters

    @property
    def ns_link(self) -> str:
        return f"spcn{self.index}{self.suffix}"

    @property
    def host_ip(self) -> str:
        return f"{SUBNET}.{self.index}.1"

    @property
    def ns_ip(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    def create(self) -> None:
        taken = sh("ip", "-o", "-4", "addr", "show", check=False).stdout
        if re.search(rf"\binet {re.escape(self.host_ip)}/", taken):
            raise RuntimeError(f"{self.host_ip} is already configured on the host: {taken}")
        sh("ip", "netns", "add", self.name)
        self.created = True
        sh("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
        sh("ip", "link", "set", self.ns_link, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_link)
        sh("ip", "link", "set", self.host_link, "up")
        sh("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_link)
        sh("ip", "-n", self.name, "link", "set", self.ns_link, "up")
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    def pids(self) -> list[int]:
        out = sh("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> list[str]:
        """Removes the namespace (and so both veth ends); returns problems."""
        problems = []
        if not self.created:
            return problems
        left = self.pids()
        if left:
            problems.append(
                f"processes still in netns {self.name}: "
                + ", ".join(f"{p} ({e2e._cmdline(p)})" for p in left)
            )
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        sh("ip", "netns", "del", self.name, check=False)
        # The pair goes with the namespace once nothing holds it; this is for the case
        # where something still did.
        sh("ip", "link", "del", self.host_link, check=False)
        self.created = False
        return problems

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]


# --------------------------------------------------------------------------- PostgreSQL


class Postgres:
    """PostgreSQL for one session: trust for 127.0.0.1/32 and the test subnets only."""

    def __init__(self, listen: list[str]):
        self.listen = listen
        self.user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="spcpg-", dir="/tmp"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = e2e.free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _as_postgres(self) -> dict:
        return dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])

    def init(self) -> None:
        proc = subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                "--locale=C.UTF-8", "-D", str(self.data),
            ],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            cwd=self.dir, **self._as_postgres(),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr}")
        (self.data / "pg_hba.conf").write_text(
            "# sandpit cluster e2e: trust loopback and the test subnets only\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            f"host all all {SUBNET}.0.0/16 trust\n"
        )

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "postgres already running"
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== e2e harness: postgres start #{self.starts}\n".encode())
        log.flush()
        os.chown(self.log_path, self.user.pw_uid, self.user.pw_gid)
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"), "-D", str(self.data), "-k", str(self.dir),
                "-h", ",".join(self.listen), "-p", str(self.port),
                "-c", "fsync=off", "-c", "full_page_writes=off",
                "-c", "max_connections=400", "-c", "shared_buffers=32MB",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.dir, **self._as_postgres(),
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log_tail()}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-U", "postgres", "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            ).returncode == 0
            if ready and all(port_open(h, self.port) for h in self.listen):
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start within 30 s:\n{self.log_tail()}")

    def _signal_and_wait(self, sig: int, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(timeout=30)

    def crash_restart(self) -> float:
        """SIGQUIT (immediate shutdown, recovery at the next start) and start again
        on the same data dir and port; returns how long it was down (s)."""
        t0 = time.monotonic()
        self._signal_and_wait(signal.SIGQUIT)
        # Its backends go with it; wait until none still holds the port.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and port_open("127.0.0.1", self.port, 0.2):
            time.sleep(0.05)
        self.start()
        return time.monotonic() - t0

    def url(self, host: str) -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres"

    def psql(self, sql: str, host: str = "127.0.0.1", netns: Netns | None = None) -> str:
        argv = [str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", host, "-p", str(self.port),
                "-U", "postgres", "-d", "postgres", "-c", sql]
        if netns is not None:
            argv = netns.nsenter(*argv)
        return sh(*argv).stdout.strip()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no postgres log)"

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGINT)  # fast shutdown

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- sandpitd roles


@dataclass
class Daemon(e2e.Server):
    """A `sandpitd` of the cluster: a runner in `netns`, or a gateway on loopback."""

    name: str = ""
    host: str = "127.0.0.1"
    netns: Netns | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [str(self.binary)]
        if self.netns is None:  # a runner takes `listen` from its config
            argv += ["--listen", f"{self.host}:{self.port}"]
        argv += ["--data-dir", str(self.data_dir)]
        for key in self.keys:
            argv += ["--api-key", key]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        argv += self.extra_args
        return self.netns.nsenter(*argv) if self.netns is not None else argv

    def accepting(self) -> bool:
        return port_open(self.host, self.port)

    @property
    def label(self) -> str:
        return self.name


# --------------------------------------------------------------------------- the balancer


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket, backend: int):
        self.client = client
        self.upstream = upstream
        self.backend = backend
        self.down_bytes = 0  # backend -> client
        self.up_bytes = 0
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Balancer:
    """Round-robin per new TCP connection over `backends`, skipping refusals."""

    def __init__(self, backends: list[tuple[str, int]]):
        self.backends = backends
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._next = 0
        self._lock = threading.Lock()
        self.live: set[_Conn] = set()
        self.accepted = [0] * len(backends)  # connections handed to each backend
        self.refused = [0] * len(backends)  # connection attempts a backend refused
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="balancer", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            first = self._next
            self._next = (self._next + 1) % len(self.backends)
        upstream = None
        chosen = -1
        for k in range(len(self.backends)):
            i = (first + k) % len(self.backends)
            try:
                upstream = socket.create_connection(self.backends[i], timeout=2)
                chosen = i
                break
            except OSError:
                with self._lock:
                    self.refused[i] += 1
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(client, upstream, chosen)
        with self._lock:
            self.accepted[chosen] += 1
            self.live.add(conn)
        t = threading.Thread(target=self._pump, args=(upstream, client, conn, True), daemon=True)
        t.start()
        self._pump(client, upstream, conn, False)
        t.join()
        with self._lock:
            self.live.discard(conn)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, conn: _Conn, down: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if down:
                    conn.down_bytes += len(data)
                else:
                    conn.up_bytes += len(data)
        except OSError:
            pass
        finally:
            conn.close()  # either side gone: both go (HTTP/2 needs no half-close)

    def snapshot(self) -> dict[int, tuple[int, int]]:
        """connection key -> (backend, bytes sent back so far), of every live connection."""
        with self._lock:
            return {id(c): (c.backend, c.down_bytes) for c in self.live}

    def streaming_backends(self, window: float = 1.0) -> set[int]:
        """The backends of the live connections on which bytes came back within `window` s."""
        before = self.snapshot()
        time.sleep(window)
        after = self.snapshot()
        return {b for k, (b, n) in after.items() if k in before and n > before[k][1]}

    def close(self) -> None:
        self._closing.set()
        self._sock.close()
        self._thread.join(timeout=5)
        with self._lock:
            conns = list(self.live)
        for c in conns:
            c.close()
