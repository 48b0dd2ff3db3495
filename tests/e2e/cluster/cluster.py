"""The whole topology of the cluster tests and the client-side helpers they share.

`Cluster.start()` builds, in this order: three network namespaces with their veths,
one PostgreSQL on loopback and the host ends of the veths, the test images in each
runner's data dir, three runners (one per namespace, `nsenter --net=...`), two
gateways on loopback, and the balancer in front of the gateways; then it waits until
both gateways list the three runners. `Cluster.close()` undoes all of it, whatever
state it is in, and returns what it found left over (processes in the runners'
cgroups, mounts, processes in the namespaces, daemons that did not exit 0).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import conftest as e2e

from .topology import RUNNER_PORT, Balancer, Daemon, Netns, Postgres, remove_stale_namespaces

RUNNER_IDS = ("r1", "r2", "r3")
# Runners that serve the direct data plane (ConnectSandbox, mTLS); r3 serves none, so a
# client's fallback through the gateway is exercised too.
DIRECT_RUNNERS = ("r1", "r2")
DIRECT_PORT = 50052
ZONES = {"r1": "a", "r2": "b", "r3": "a"}
# The lease both roles are configured with; runners heartbeat every quarter of it.
LEASE_S = float(os.environ.get("SANDPIT_CLUSTER_LEASE_S", "2"))
# Each runner's sandbox cap (`max_sandboxes`, reported to the registry as its allocatable
# sandbox count). With the default requests (50m CPU) and two CPUs per runner on this
# 2-core host the CPU axis allows 40 as well.
RUNNER_CAP = int(os.environ.get("SANDPIT_CLUSTER_RUNNER_CAP", "40"))
# The session's files on a tmpfs mounted at the cluster dir (SANDPIT_CLUSTER_TMPFS=0: on
# SANDPIT_E2E_TMP's file system, /tmp by default, like the single-host tests).
TMPFS = os.environ.get("SANDPIT_CLUSTER_TMPFS", "1") != "0"
RPC = 60  # seconds: bound on any single client operation's .result()


def lease_text() -> str:
    return f"{LEASE_S:g}s"


# --------------------------------------------------------------------------- client helpers

_ENV_LOCK = threading.Lock()


@contextmanager
def base_url_env(url: str):
    """`list_runners`/`get_runner` read the endpoint only from CWSANDBOX_BASE_URL."""
    with _ENV_LOCK:
        old = os.environ.get("CWSANDBOX_BASE_URL")
        os.environ["CWSANDBOX_BASE_URL"] = url
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("CWSANDBOX_BASE_URL", None)
            else:
                os.environ["CWSANDBOX_BASE_URL"] = old


def list_runners(url: str, principal: e2e.Principal, include_resources: bool = True):
    import cwsandbox

    with base_url_env(url):
        return cwsandbox.list_runners(auth=principal.bearer, include_resources=include_resources)


def get_runner(url: str, principal: e2e.Principal, runner_id: str, organization_id: str):
    import cwsandbox

    with base_url_env(url):
        return cwsandbox.get_runner(runner_id, organization_id=organization_id, auth=principal.bearer)


def live_runner_ids(url: str, principal: e2e.Principal) -> set[str]:
    """The runners a gateway's discovery lists as healthy."""
    return {r.runner_id for r in list_runners(url, principal, include_resources=False) if r.healthy}


def run(url: str, principal: e2e.Principal, *args: str, data_plane: str = "auto", **kw):
    """`Sandbox.run(*args)` at `url` as `principal`: returns once the create is accepted.

    `Sandbox.run` takes the endpoint from `SandboxDefaults(base_url=...)` (CWSANDBOX_BASE_URL,
    which would win over it, is kept out of the environment by the conftest). `data_plane`
    is the client's DataPlaneMode: "auto" (direct to the runner when it offers it, else
    through the gateway), "gateway" or "direct"."""
    from cwsandbox import Sandbox, SandboxDefaults

    defaults = SandboxDefaults(base_url=url, data_plane_mode=data_plane)
    return Sandbox.run(*args, defaults=defaults, auth=principal.bearer, **kw)


def started(url: str, principal: e2e.Principal, *args: str, **kw):
    """A sandbox that is RUNNING (its runner_id known)."""
    sb = run(url, principal, *args, **kw)
    sb.wait(timeout=RPC)
    return sb


def from_id(url: str, principal: e2e.Principal, sandbox_id: str):
    from cwsandbox import Sandbox

    return Sandbox.from_id(sandbox_id, base_url=url, auth=principal.bearer).result(timeout=RPC)


def list_ids(url: str, principal: e2e.Principal, **kw) -> dict[str, str]:
    """sandbox id -> runner id of the principal's sandboxes (`Sandbox.list(**kw)`)."""
    from cwsandbox import Sandbox

    boxes = Sandbox.list(base_url=url, auth=principal.bearer, timeout_seconds=30, **kw).result(
        timeout=RPC
    )
    return {b.sandbox_id: b.runner_id for b in boxes}


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Polls `predicate()` (exceptions count as false) until truthy; returns its value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s (last: {last})")
        time.sleep(interval)


# --------------------------------------------------------------------------- the cluster


def _remove_cgroup_dirs(name: str) -> None:
    """rmdir (deepest first) every cgroup directory named `name` and below, in every hierarchy."""
    root = Path("/sys/fs/cgroup")
    candidates = [root / name] + [p / name for p in root.iterdir() if p.is_dir()]
    for top in candidates:
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


class Cluster:
    def __init__(self, binaries: e2e.Binaries, keys: list[str], *, cluster_mode: bool = True):
        self.binaries = binaries
        self.keys = keys
        self.cluster_mode = cluster_mode
        self.suffix = secrets.token_hex(3)
        self.root = Path(tempfile.mkdtemp(prefix="spc-", dir=os.environ.get("SANDPIT_E2E_TMP", "/tmp")))
        # The session's files (three data dirs, ~40k files of image layers) on a tmpfs of
        # their own: removing them from this VM's disk took 20-25 s; unmounting is instant.
        self.tmpfs = TMPFS
        if self.tmpfs:
            mount = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=8g,mode=0700", "spc-e2e", str(self.root)],
                capture_output=True, text=True,
            )
            if mount.returncode != 0:
                self.root.rmdir()
                raise RuntimeError(f"mount a tmpfs for the cluster: {mount.stderr}")
        self.netns = {rid: Netns(i + 1, self.suffix) for i, rid in enumerate(RUNNER_IDS)}
        self.pg: Postgres | None = None
        self.runners: dict[str, Daemon] = {}
        self.gateways: list[Daemon] = []
        self.balancer: Balancer | None = None
        self.keep = False
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ names

    def cgroup_parent(self, name: str) -> str:
        return f"sandpit-e2e-{name}-{self.suffix}"

    @property
    def cgroup_parents(self) -> list[str]:
        return [self.cgroup_parent(n) for n in (*RUNNER_IDS, "gw1", "gw2")]

    @property
    def gateway(self) -> Daemon:
        return self.gateways[0]

    # ------------------------------------------------------------------ configs

    def runner_config(self, rid: str, cap: int = RUNNER_CAP) -> str:
        ns = self.netns[rid]
        text = (
            f'runner_id = "{rid}"\n'
            f'listen = "0.0.0.0:{RUNNER_PORT}"\n'
            "insecure = true\n"
            f'cgroup_parent = "{self.cgroup_parent(rid)}"\n'
            f"max_sandboxes = {cap}\n"
            "[limits]\n"
            # The sandbox count is the axis that binds: CPU for twice the cap at the
            # default request (50m), whatever the host's CPUs.
            f'allocatable_cpu = "{cap * 100}m"\n'
            f'data_dir_reserve = "{e2e.TEST_DISK_RESERVE}"\n'
            # One LXCFS per host is shared by design; off keeps the runners independent.
            'lxcfs = "off"\n'
            # Plain-directory writable layers: no loop device and no pre-formatted pool
            # per sandbox (three daemons and 150 sandboxes on a 2-core host).
            'ephemeral_storage = "0"\n'
            "disk_pool = 0\n"
            # The network layout lock (/run/sandpit/network-TABLE.lock) is host-wide
            # (the mount namespace is shared): each runner names its own table. Links,
            # addresses and ports live in its own network namespace.
            "[network]\n"
            f'table = "spc_{rid}_{self.suffix}"\n'
            "upstream_dns = []\n"
            "[metrics]\n"
            'listen = "off"\n'
        )
        if self.cluster_mode:
            text += (
                "[cluster]\n"
                'role = "runner"\n'
                f'database_url = "{self.pg.url(ns.host_ip)}"\n'
                f'advertise = "http://{ns.ns_ip}:{RUNNER_PORT}"\n'
                f'labels = {{ zone = "{ZONES[rid]}" }}\n'
                f'lease = "{lease_text()}"\n'
            )
            if rid in DIRECT_RUNNERS:
                text += (
                    f'direct_listen = "0.0.0.0:{DIRECT_PORT}"\n'
                    f'direct_advertise = "https://{ns.ns_ip}:{DIRECT_PORT}"\n'
                    f'client_ca_file = "{self.ca_cert}"\n'
                )
        return text

    @property
    def ca_cert(self) -> Path:
        return self.root / "cluster-ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "cluster-ca.key"

    def _make_ca(self) -> None:
        """The cluster CA: gateways sign ConnectSandbox credentials with it, runners with a
        direct endpoint trust only it for clients."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sandpit e2e CA {self.suffix}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.ca_key.chmod(0o600)

    def gateway_config(self, name: str) -> str:
        return (
            f'cgroup_parent = "{self.cgroup_parent(name)}"\n'
            "[limits]\n"
            f'data_dir_reserve = "{e2e.TEST_DISK_RESERVE}"\n'
            'lxcfs = "off"\n'
            # A gateway holds no sandboxes: nothing of a sandbox network on the host.
            "[network]\n"
            "enabled = false\n"
            "[metrics]\n"
            'listen = "off"\n'
            "[cluster]\n"
            'role = "gateway"\n'
            f'database_url = "{self.pg.url("127.0.0.1")}"\n'
            f'lease = "{lease_text()}"\n'
            f'ca_cert_file = "{self.ca_cert}"\n'
            f'ca_key_file = "{self.ca_key}"\n'
        )

    # ------------------------------------------------------------------ start

    def _timed(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 2)

    def _import_images(self) -> None:
        tar = self.root / "python311-e2e.tar"
        e2e.build_test_rootfs(e2e._rootfs_tar(), tar)

        first = self.root / RUNNER_IDS[0] / "data"
        first.mkdir(parents=True, exist_ok=True)
        try:
            for reference in e2e.IMAGE_REFERENCES:
                cmd = [
                    str(self.binaries.sandpit), "--data-dir", str(first), "image", "import",
                    reference, str(tar),
                    *[a for e in e2e.IMAGE_ENV for a in ("--env", e)],
                    "--workdir", e2e.IMAGE_WORKDIR, "--cmd", *e2e.IMAGE_CMD,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"image import failed: {' '.join(cmd)}: {proc.stderr}")
        finally:
            tar.unlink(missing_ok=True)
        # The other runners' stores: the unpacked layers hard-linked (content-addressed
        # and only ever read, as overlay lower dirs), the store's own files copied, so
        # that no runner shares its store lock (a flock on store.json) or its metadata.
        src = first / "store"
        for rid in RUNNER_IDS[1:]:
            data = self.root / rid / "data"
            data.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(src), str(data / "store")], check=True, timeout=120)
            for path in (data / "store").rglob("*"):
                if path.is_file() and "layers" not in path.relative_to(data / "store").parts:
                    path.unlink()
                    shutil.copy2(src / path.relative_to(data / "store"), path)

    def _daemon(self, name: str, config_text: str, **kw) -> Daemon:
        """A daemon with its dir, data dir, config and log under the cluster dir."""
        d = self.root / name
        (d / "data").mkdir(parents=True, exist_ok=True)
        config = d / "sandpitd.toml"
        config.write_text(config_text)
        return Daemon(
            binary=self.binaries.sandpitd,
            data_dir=d / "data",
            keys=self.keys,
            log_path=d / "sandpitd.log",
            config=config,
            name=name,
            **kw,
        )

    def _runner(self, rid: str) -> Daemon:
        ns = self.netns[rid]
        return self._daemon(rid, self.runner_config(rid), port=RUNNER_PORT, host=ns.ns_ip, netns=ns)

    def _gateway(self, name: str) -> Daemon:
        return self._daemon(name, self.gateway_config(name))

    def start(self, principal: e2e.Principal) -> None:
        t0 = time.monotonic()
        busy = remove_stale_namespaces()
        if busy:
            raise RuntimeError(f"namespaces of an earlier run still have processes: {busy}")
        for ns in self.netns.values():
            ns.create()
        self._timed("netns", t0)

        t = time.monotonic()
        self.pg = Postgres(["127.0.0.1"] + [ns.host_ip for ns in self.netns.values()])
        self.pg.init()
        self.pg.start()
        self._timed("postgres", t)

        self._make_ca()
        t = time.monotonic()
        self._import_images()
        self._timed("images", t)

        t = time.monotonic()
        for rid in RUNNER_IDS:
            self.runners[rid] = self._runner(rid)
            self.runners[rid].start()
        self._timed("runners", t)
        if not self.cluster_mode:
            return

        t = time.monotonic()
        for name in ("gw1", "gw2"):
            gw = self._gateway(name)
            self.gateways.append(gw)
            gw.start()
        self.balancer = Balancer([("127.0.0.1", gw.port) for gw in self.gateways])
        self._timed("gateways", t)

        t = time.monotonic()
        for gw in self.gateways:
            wait_for(
                lambda: set(RUNNER_IDS) <= live_runner_ids(gw.url, principal),
                timeout=30,
                what=f"{gw.name} listing {', '.join(RUNNER_IDS)}",
            )
        self._timed("registered", t)

    # ------------------------------------------------------------------ faults

    def restart_runner(self, rid: str, *, kill: bool = True) -> None:
        self.runners[rid].restart(kill=kill)

    # ------------------------------------------------------------------ diagnostics

    def logs(self, lines: int = 40) -> list[tuple[str, str]]:
        out = []
        for name, d in [*self.runners.items(), *((g.name, g) for g in self.gateways)]:
            out.append((f"{name} log (tail)", d.log_tail(lines)))
        if self.pg is not None:
            out.append(("postgres log (tail)", self.pg.log_tail(20)))
        return out

    # ------------------------------------------------------------------ teardown

    def close(self, principals: list[e2e.Principal]) -> list[str]:
        problems: list[str] = []
        t0 = time.monotonic()

        def attempt(what: str, fn) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - collected and reported
                problems.append(f"{what}: {type(e).__name__}: {e}")

        # 1. Every sandbox of our principals, through a gateway (else each runner directly).
        swept = False
        for gw in self.gateways:
            if gw.alive():
                try:
                    e2e.sweep(gw, principals)
                    swept = True
                    break
                except Exception as e:  # noqa: BLE001
                    problems.append(f"final sweep through {gw.name}: {e}")
        if not swept:
            for r in self.runners.values():
                if r.alive():
                    try:
                        e2e.sweep(r, principals)
                    except Exception:  # noqa: BLE001 - the cgroup check below tells
                        pass
        self._timed("close: sweep", t0)
        # 2. The balancer and the daemons: each must exit 0 on SIGTERM.
        if self.balancer is not None:
            attempt("balancer close", self.balancer.close)
        for d in [*self.gateways, *self.runners.values()]:
            if d.proc is None:
                continue
            if not d.alive():
                if d.proc.returncode not in (0, -9):
                    problems.append(f"{d.name} had exited with {d.proc.returncode}")
                continue
            t = time.monotonic()
            try:
                code = d.stop()
                self._timed(f"close: stop {d.name}", t)
                if code != 0:
                    problems.append(f"{d.name} exited with {code} on SIGTERM (expected 0)")
            except Exception as e:  # noqa: BLE001
                problems.append(f"stop {d.name}: {e}")
                attempt(f"kill {d.name}", d.kill9)
        t = time.monotonic()
        # 3. Nothing left of a sandbox: processes in the runners' cgroups, mounts.
        deadline = time.monotonic() + 10
        while True:
            left = e2e.cgroup_procs(self.cgroup_parents)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if left:
            problems.append(
                "processes left in the runners' cgroups after the final sweep:\n"
                + "\n".join(f"  pid {p} in {c}: {e2e._cmdline(p)}" for p, c in sorted(left.items()))
            )
            for p in left:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        mounts = [m for m in e2e.mounts_under(self.root) if m.split()[4] != str(self.root)]
        if mounts:
            problems.append("mounts left under the cluster dir:\n" + "\n".join(f"  {m}" for m in mounts))
            for line in reversed(mounts):
                point = line.split()[4]
                subprocess.run(["umount", "-l", point], capture_output=True)
        t = time.monotonic()
        for name in self.cgroup_parents:
            _remove_cgroup_dirs(name)
        self._timed("close: cgroup dirs", t)
        for rid in RUNNER_IDS:  # the host-wide network layout locks of our tables
            Path(f"/run/sandpit/network-spc_{rid}_{self.suffix}.lock").unlink(missing_ok=True)
        self._timed("close: leak check", t)
        # 4. PostgreSQL, the namespaces (with their veths), the files.
        t = time.monotonic()
        if self.pg is not None:
            attempt("postgres stop", self.pg.stop)
            attempt("postgres log", lambda: shutil.copyfile(self.pg.log_path, self.root / "postgres.log"))
            attempt("postgres dir", self.pg.remove)
        self._timed("close: postgres", t)
        t = time.monotonic()
        for ns in self.netns.values():
            problems += ns.delete()
        self._timed("close: netns", t)
        t = time.monotonic()
        if problems or self.keep or os.environ.get("SANDPIT_E2E_KEEP"):
            self.keep = True
        mnt = self.root
        if self.tmpfs:
            if self.keep:  # the logs and configs outlive the tmpfs (SANDPIT_CLUSTER_TMPFS=0 keeps all)
                kept = Path(f"{mnt}-kept")
                for f in mnt.rglob("*"):
                    if f.is_file() and f.suffix in (".log", ".toml"):
                        (kept / f.relative_to(mnt)).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, kept / f.relative_to(mnt))
                self.root = kept
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                problems.append(f"the cluster's tmpfs at {mnt} was busy: detached lazily")
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            shutil.rmtree(mnt, ignore_errors=True)
        elif not self.keep:
            shutil.rmtree(mnt, ignore_errors=True)
        self._timed("close: files", t)
        return problems
