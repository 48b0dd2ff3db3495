#!/usr/bin/env python3
"""Soak and fault injection for sandpitd, through the real `cwsandbox` client.

Starts a `sandpitd` of its own (temp data dir, free loopback port, its own
cgroup parent `sandpit-soak-<hex>`, `[network] enabled = false`), with the
e2e test images imported (tests/e2e/conftest.py), then:

1. counts what a sandbox can leave behind on the host (the baseline);
2. runs `--cycles` create/exec/delete cycles on `--concurrency` threads, with
   random faults (an exec timed out by the client, a sandbox deleted while an
   exec runs, the main process killed from inside, a stop with a short grace);
   RSS and open fds of sandpitd are taken after a warm-up (10% of the cycles)
   and after the cycles, each time with no sandbox live;
3. `--faults` times: kill -9 of sandpitd during a create, a delete or an image
   pull (from a loopback docker-registry), restart on the same data dir, check
   every record the client lists, delete everything and count again.

Exit 1 when a count ends above the baseline, RSS grew past the threshold, fds
grew after the warm-up, or a cycle/fault went wrong. See docs/testing.md.
Run as root: scripts/soak.py --quick (CI), or scripts/soak.py --cycles 1000.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from conftest import (  # noqa: E402 - after the path is set
    Binaries,
    Server,
    _find_binary,
    free_port,
    import_test_images,
    mounts_under,
)

RPC = 60  # seconds: bound on one client call's .result()
TERMINAL = {"completed", "failed", "terminated"}
# Counts that must come back to the baseline once no sandbox is live.
LEAK_KEYS = [
    "mounts", "cgroup_dirs", "cgroup_procs", "sandpit_procs", "orphans", "state_entries",
    "data_files", "store_tmp", "leases", "loop_devices", "records_live",
]
FAULTS = ["none"] * 4 + ["exec_timeout", "delete_during_exec", "main_killed", "short_grace"]


T0 = time.monotonic()


def log(text: str) -> None:
    print(f"soak: [{time.monotonic() - T0:6.1f} s] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- counting


def _walk_count(root: Path, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(files, dirs) under root, not descending into mount points or `skip` names."""
    files = dirs = 0
    if not root.exists():
        return 0, 0
    for top, dnames, fnames in os.walk(root):
        keep = []
        for d in dnames:
            p = os.path.join(top, d)
            if d in skip and top == str(root):
                continue
            dirs += 1
            if not os.path.ismount(p):
                keep.append(d)
        dnames[:] = keep
        files += len(fnames)
    return files, dirs


def _proc_info(pid: str) -> tuple[int, str, list[str]]:
    """(ppid, exe, cgroup paths) of a process, or raises OSError."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    cgroups = [line.split(":", 2)[-1] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    return ppid, exe, cgroups


class Probe:
    """What this daemon can leave on the host, counted from /proc, /sys and its data dir."""

    def __init__(self, server: Server, parent: str, network: bool):
        self.server = server
        self.parent = parent
        self.network = network
        self.target = str(REPO_ROOT / "target")

    def cgroup_roots(self) -> list[Path]:
        return [p for p in Path("/sys/fs/cgroup").glob(f"*/{self.parent}") if p.is_dir()] + [
            p for p in [Path("/sys/fs/cgroup") / self.parent] if p.is_dir()
        ]

    def daemon(self) -> dict:
        pid = self.server.pid
        out = {"daemon_fds": -1, "daemon_rss_kib": -1}
        if pid and self.server.alive():
            out["daemon_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out["daemon_rss_kib"] = int(line.split()[1])
        return out

    def count(self, client: bool = True) -> dict:
        data = self.server.data_dir
        c: dict = {"mounts": len(mounts_under(data))}
        c["cgroup_dirs"] = sum(_walk_count(r)[1] for r in self.cgroup_roots())
        procs = sandpit = orphans = 0
        marker = f"/{self.parent}/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.server.pid:
                continue
            try:
                ppid, exe, cgroups = _proc_info(entry)
            except (OSError, ValueError, IndexError):
                continue
            mine_cg = any(marker in g or g.endswith(f"/{self.parent}") for g in cgroups)
            agent = os.path.basename(exe) in ("sandpit-agent", ".sandpit-agent")
            # A spawner of this checkout run by our daemon, or left behind by it (PID 1's now).
            spawner = exe.startswith(self.target) and os.path.basename(exe) == "sandpit-spawn" and (
                ppid in (1, self.server.pid))
            procs += mine_cg
            sandpit += spawner or (agent and mine_cg)
            # Children of none: reparented to PID 1. A sandbox's agent is, by design
            # (sandboxes outlive the daemon); anything else of ours is not.
            orphans += (spawner or mine_cg) and ppid == 1 and not agent
        c.update(cgroup_procs=procs, sandpit_procs=sandpit, orphans=orphans)
        files, dirs = _walk_count(data / "sandboxes")
        c["state_entries"] = files + dirs
        # The image store is a cache (a pulled image stays); its staging and leases are not.
        # The disk pool's level moves by design (taken by creates, refilled behind them);
        # a pooled image in use is a sandbox's disk.img, counted under state_entries.
        c["data_files"] = _walk_count(data, skip=("store", "disk-pool"))[0]
        c["store_tmp"] = sum(_walk_count(data / "store" / "tmp"))
        c["leases"] = sum(_walk_count(data / "store" / "leases"))
        loops = 0
        for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                loops += bf.read_text().strip().startswith(str(data))
            except OSError:
                pass
        c["loop_devices"] = loops
        if self.network:
            c.update(self.net())
        if client and self.server.alive():
            c["records_live"] = sum(1 for b in list_all() if str(b.status) not in TERMINAL)
        c.update(self.daemon())
        return c

    def net(self) -> dict:
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        names = [l.split(":")[1].strip().split("@")[0] for l in links.splitlines()]
        out = {"links": sum(n.startswith(("sp-", "spn-")) for n in names)}
        raw = subprocess.run(["nft", "-j", "list", "table", "inet", "sandpit"], capture_output=True, text=True)
        sets = chains = elems = 0
        if raw.returncode == 0:
            for item in json.loads(raw.stdout).get("nftables", []):
                sets += "set" in item or "map" in item
                chains += "chain" in item
                elems += len((item.get("set") or item.get("map") or {}).get("elem", []))
        out.update(nft_sets=sets, nft_chains=chains, nft_elements=elems)
        return out


# --------------------------------------------------------------------------- client helpers


def cw():
    import cwsandbox

    return cwsandbox


def list_all():
    return cw().Sandbox.list(show_terminated=True, timeout_seconds=30).result(timeout=RPC)


def stop_all(grace: float = 0) -> None:
    for b in cw().Sandbox.list(timeout_seconds=30).result(timeout=RPC):
        try:
            b.stop(graceful_shutdown_seconds=grace, missing_ok=True).result(timeout=RPC)
        except Exception as e:  # noqa: BLE001 - a sandbox ending meanwhile
            print(f"soak: stop {b.sandbox_id}: {type(e).__name__}: {e}", file=sys.stderr)


def sleeping(sb, arg: str) -> int:
    """Processes in the sandbox whose command line is `sleep <arg>`."""
    r = sb.exec(["ps", "-eo", "args"]).result(timeout=RPC)
    return sum(1 for line in r.stdout.splitlines() if line.strip() == f"sleep {arg}")


def gone_within(sb, arg: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while sleeping(sb, arg):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# --------------------------------------------------------------------------- cycles


class Soak:
    def __init__(self, args, server: Server, probe: Probe):
        self.args = args
        self.server = server
        self.probe = probe
        self.lock = threading.Lock()
        self.next = 0
        self.done = 0
        self.faults_seen: dict[str, int] = {}
        self.max_seconds: dict[str, float] = {}  # the slowest cycle of each kind
        self.kill_exec_interrupted = 0
        self.errors: list[str] = []
        self.anomalies: list[str] = []
        self.deadline = time.monotonic() + args.max_seconds

    def cycle(self, i: int) -> None:
        C = cw()
        rng = random.Random(self.args.seed * 1_000_003 + i)
        fault = rng.choice(FAULTS)
        t0 = time.monotonic()
        try:
            self._cycle(i, rng, fault)
        finally:
            took = time.monotonic() - t0
            with self.lock:
                self.faults_seen[fault] = self.faults_seen.get(fault, 0) + 1
                self.max_seconds[fault] = round(max(self.max_seconds.get(fault, 0), took), 2)

    def _cycle(self, i: int, rng: random.Random, fault: str) -> None:
        C = cw()
        # For a short grace, the main process ignores SIGTERM: only the grace's end stops it.
        main = ["sh", "-c", "trap '' TERM; exec sleep infinity"] if fault == "short_grace" else ["sleep", "infinity"]
        sb = C.Sandbox.run(*main, tags=["soak"], request_timeout_seconds=30)
        try:
            sb.wait(timeout=RPC)
            r = sb.exec(["sh", "-c", f"echo cycle-{i}"]).result(timeout=RPC)
            if r.returncode != 0 or r.stdout != f"cycle-{i}\n":
                self.anomaly(i, fault, f"exec gave {r.returncode} {r.stdout!r} {r.stderr!r}")
            if fault == "exec_timeout":
                t = rng.choice([0.3, 0.8, 1.5])
                p = sb.exec(["sleep", "31"], timeout_seconds=t)
                try:
                    p.result(timeout=RPC)
                    self.anomaly(i, fault, f"a 31 s exec with timeout_seconds={t} returned")
                except C.SandboxTimeoutError:
                    pass
                if not gone_within(sb, "31", 5):
                    self.anomaly(i, fault, "the timed-out exec's process still runs 5 s later")
            elif fault == "delete_during_exec":
                p = sb.exec(["sleep", "32"])
                time.sleep(rng.uniform(0, 0.5))
                C.Sandbox.delete(sb.sandbox_id, missing_ok=True).result(timeout=RPC)
                try:
                    res = p.result(timeout=RPC)
                    if res.returncode == 0:
                        self.anomaly(i, fault, "the exec of a deleted sandbox exited 0")
                except TimeoutError:
                    self.anomaly(i, fault, f"the exec did not end within {RPC} s of the delete")
                except C.CWSandboxError:
                    pass
            elif fault == "main_killed":
                try:
                    sb.exec(["sh", "-c", "kill -9 $(pgrep -x sleep)"]).result(timeout=RPC)
                except C.SandboxExecutionError as e:
                    # The sandbox ends with its main process, and the killing exec with it:
                    # at times before its exit status is sent (~1% of these cycles).
                    if "interrupted" not in str(e):
                        raise
                    with self.lock:
                        self.kill_exec_interrupted += 1
                try:
                    sb.wait_until_complete(timeout=RPC).result(timeout=RPC)
                except C.SandboxFailedError:
                    pass
                st = C.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC)
                if str(st.status) not in TERMINAL:
                    self.anomaly(i, fault, f"main process killed, sandbox still {st.status}")
            elif fault == "short_grace":
                # `sleep infinity` in ps: the main shell has set its trap and exec'd.
                deadline = time.monotonic() + 10
                while not sleeping(sb, "infinity") and time.monotonic() < deadline:
                    time.sleep(0.05)
                sb.exec(["sh", "-c", "trap '' TERM; sleep 33"])
                grace = rng.choice([0, 1, 2])
                t0 = time.monotonic()
                sb.stop(graceful_shutdown_seconds=grace).result(timeout=RPC)
                took = time.monotonic() - t0
                if took > grace + 10 or took < grace - 0.2:
                    self.anomaly(i, fault, f"stop with grace {grace} s took {took:.1f} s")
        finally:
            sb.stop(graceful_shutdown_seconds=0, missing_ok=True).result(timeout=RPC)
        st = C.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC)
        if str(st.status) not in TERMINAL:
            self.anomaly(i, fault, f"after stop the record says {st.status}")

    def anomaly(self, i: int, fault: str, text: str) -> None:
        with self.lock:
            self.anomalies.append(f"cycle {i} ({fault}): {text}")

    def worker(self, upto: int) -> None:
        while True:
            with self.lock:
                if self.next >= upto or time.monotonic() > self.deadline:
                    return
                i = self.next
                self.next += 1
            try:
                self.cycle(i)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.errors.append(f"cycle {i}: {type(e).__name__}: {e}")
                    if self.args.verbose:
                        traceback.print_exc()
            with self.lock:
                self.done += 1

    def run_until(self, upto: int) -> None:
        threads = [threading.Thread(target=self.worker, args=(upto,)) for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def settle(probe: Probe, baseline: dict, timeout: float) -> dict:
    """Stops what is live, then waits for every leak count to reach the baseline (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        if probe.server.alive():
            stop_all()
        c = probe.count()
        if all(c.get(k, 0) <= baseline.get(k, 0) for k in LEAK_KEYS) or time.monotonic() > deadline:
            return c
        time.sleep(1)


def leaks(baseline: dict, now: dict, keys=None) -> list[str]:
    keys = keys or [k for k in now if k in LEAK_KEYS or k.startswith(("links", "nft_"))]
    return [f"{k}: {baseline.get(k, 0)} -> {now.get(k, 0)}" for k in keys if now.get(k, 0) > baseline.get(k, 0)]


# --------------------------------------------------------------------------- faults


def unique_images(root: Path, count: int) -> list[Path]:
    """`count` busybox rootfs tars, each with a layer no other has (so each pull is a real one)."""
    src = REPO_ROOT / ".cache" / "images" / "busybox.tar"
    out = []
    for k in range(count):
        tar_path = root / f"busybox-{k}.tar"
        shutil.copyfile(src, tar_path)
        with tarfile.open(tar_path, mode="a", format=tarfile.GNU_FORMAT) as tar:
            data = (secrets.token_hex(16) + "\n").encode() * 20000  # ~660 KB: a pull takes a while
            info = tarfile.TarInfo(f"./etc/soak-{k}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        out.append(tar_path)
    return out


def in_background(fn, errors: list) -> threading.Thread:
    def body():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the daemon is killed under it on purpose
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def check_records(server: Server) -> list[str]:
    """Every non-terminal record has a live sandbox that execs; failed ones say why."""
    C = cw()
    problems = []
    deadline = time.monotonic() + 60
    for b in list_all():
        status = str(b.status)
        while status in {"creating", "pending", "preparing", "unspecified", "terminating"} and time.monotonic() < deadline:
            time.sleep(0.5)
            b = C.Sandbox.from_id(b.sandbox_id).result(timeout=RPC)
            status = str(b.status)
        if status == "running":
            try:
                r = b.exec(["echo", "alive"]).result(timeout=RPC)
                if r.stdout != "alive\n":
                    problems.append(f"{b.sandbox_id} RUNNING but exec gave {r.returncode} {r.stdout!r}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{b.sandbox_id} RUNNING but exec failed: {type(e).__name__}: {e}")
        elif status == "failed" and not (b.status_reason or "").strip():
            problems.append(f"{b.sandbox_id} FAILED without a reason")
        elif status not in TERMINAL and status != "running":
            problems.append(f"{b.sandbox_id} still {status} 60 s after the restart")
    return problems


def run_faults(args, server: Server, probe: Probe, baseline: dict, registry_host: str | None, images: list[Path]) -> list[dict]:
    from test_registry import skopeo_push

    C = cw()
    rng = random.Random(args.seed + 7)
    points = (["create", "delete", "pull"] * args.faults)[: args.faults]
    rng.shuffle(points)
    results = []
    for k, point in enumerate(points):
        delay = rng.uniform(0.0, 0.6)
        errors: list[str] = []
        threads = []
        ref = f"{registry_host}/soak/busybox:{k}"
        if point == "pull":
            skopeo_push(images[k], ref)
        t0 = time.monotonic()
        if point == "create":
            threads = [in_background(lambda: C.Sandbox.run(
                "sleep", "infinity", tags=["soak-fault"], request_timeout_seconds=10).wait(timeout=30), errors)
                for _ in range(3)]
        elif point == "delete":
            boxes = [C.Sandbox.run("sleep", "infinity", tags=["soak-fault"]) for _ in range(3)]
            for b in boxes:
                b.wait(timeout=RPC)
            t0 = time.monotonic()
            threads = [in_background(lambda b=b: b.stop(graceful_shutdown_seconds=1).result(timeout=30), errors)
                       for b in boxes]
        else:
            threads = [in_background(lambda: C.Sandbox.run(
                "sleep", "infinity", container_image=ref, tags=["soak-fault"],
                request_timeout_seconds=10).wait(timeout=30), errors)]
        time.sleep(max(0.0, delay - (time.monotonic() - t0)))
        server.kill9()
        restart_ok, problems, states, reasons = True, [], {}, []
        try:
            server.start()
        except AssertionError as e:
            restart_ok = False
            problems.append(f"restart failed: {str(e)[:2000]}")
        for t in threads:
            t.join(timeout=45)
        if restart_ok:
            for b in list_all():
                states[str(b.status)] = states.get(str(b.status), 0) + 1
                if str(b.status) == "failed":
                    reasons.append(f"{b.sandbox_id}: {b.status_reason}")
            problems += check_records(server)
            after = settle(probe, baseline, args.settle_seconds)
            problems += [f"leak {l}" for l in leaks(baseline, after)]
        outcome = {"fault": k, "point": point, "kill_after_s": round(delay, 3), "ok": not problems,
                   "records_after_restart": states, "failed_reasons": reasons, "client_errors": errors, "problems": problems,
                   "seconds": round(time.monotonic() - t0, 1)}
        print(f"soak: fault {k}: kill -9 during {point} after {delay:.2f} s; records after the restart "
              f"{states}; client calls that failed: {len(errors)}: "
              f"{'ok' if not problems else 'PROBLEMS ' + '; '.join(problems)}", file=sys.stderr)
        results.append(outcome)
        if not restart_ok:
            break
    return results


# --------------------------------------------------------------------------- main


def sweep(server: Server, parent: str) -> list[str]:
    """Removes by force what a failed run left of its daemon: the processes in its
    cgroup parent, the mounts under its data dir, loop devices backed by its files.
    A failing soak must not leave debris that fails the next test (or the host's)."""
    swept: list[str] = []
    data = str(server.data_dir)
    if server.alive():
        server.kill9()
    for root in Probe(server, parent, False).cgroup_roots():
        for procs in root.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), 9)
                    swept.append(f"process {pid}")
                except (OSError, ValueError):
                    pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            p.read_text().strip() for r in Probe(server, parent, False).cgroup_roots() for p in r.rglob("cgroup.procs")):
        time.sleep(0.05)
    # Deepest first, detached (a busy mount point would otherwise stay).
    points = sorted({line.split()[4] for line in mounts_under(Path(data)) if line.split()[4].startswith(data)},
                    key=len, reverse=True)
    for point in points:
        if subprocess.run(["umount", "-l", point], capture_output=True).returncode == 0:
            swept.append(f"mount {point}")
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = bf.read_text().strip()
        except OSError:
            continue
        if backing.startswith(data):
            dev = f"/dev/{bf.parent.parent.name}"
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                swept.append(f"loop {dev}")
    for root in Probe(server, parent, False).cgroup_roots():
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
    return swept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--faults", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=1800)
    ap.add_argument("--settle-seconds", type=float, default=60)
    ap.add_argument("--rss-growth", type=float, default=0.30, help="fraction (with --rss-mib)")
    ap.add_argument("--rss-mib", type=float, default=20)
    ap.add_argument("--fd-slack", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="CI: 40 cycles, concurrency 4, 3 faults")
    ap.add_argument("--network", action="store_true", help="networking on (one such daemon per host)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--self-test-leak", action="store_true",
                    help="plant a mount and a cgroup after the baseline: the run must fail")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.concurrency, args.faults = 40, 4, 3  # one kill at each point
        args.max_seconds = min(args.max_seconds, 60)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if os.geteuid() != 0:
        print("soak: needs root (namespaces, cgroups, mounts)", file=sys.stderr)
        return 2

    binaries = Binaries(sandpitd=_find_binary("SANDPITD_BIN", "sandpitd"), sandpit=_find_binary("SANDPIT_BIN", "sandpit"))
    root = Path(tempfile.mkdtemp(prefix="spsoak-", dir=os.environ.get("SANDPIT_E2E_TMP", "/tmp")))
    parent = f"sandpit-soak-{secrets.token_hex(3)}"
    key = f"sandpitsoak{secrets.token_hex(24)}"
    os.environ.update(CWSANDBOX_API_KEY=key)
    registry = None
    t_start = time.monotonic()
    result: dict = {"seed": args.seed, "cycles_asked": args.cycles, "concurrency": args.concurrency,
                    "faults_asked": args.faults, "cgroup_parent": parent, "root": str(root)}
    server = None
    ok = False
    try:
        config = f'cgroup_parent = "{parent}"\nretention_seconds = 3\ngc_interval_seconds = 1\nmax_sandboxes = 64\n'
        images: list[Path] = []
        if args.faults:
            from test_registry import start_registry

            registry = start_registry(root / "registry")
            config += f'[registry.registries."{registry.host}"]\ninsecure = true\n'
            images = unique_images(root, args.faults)
        config += "[network]\nenabled = true\nupstream_dns = []\n" if args.network else "[network]\nenabled = false\n"
        (root / "sandpitd.toml").write_text(config)
        log(f"importing the test images into {root / 'data'}")
        import_test_images(binaries, root, root / "data")
        server = Server(binary=binaries.sandpitd, data_dir=root / "data", keys=[key],
                        log_path=root / "sandpitd.log", config=root / "sandpitd.toml")
        server.start()
        os.environ["CWSANDBOX_BASE_URL"] = server.url
        probe = Probe(server, parent, args.network)
        baseline = probe.count()
        result["baseline"] = baseline
        if args.self_test_leak:
            planted = root / "data" / "sandboxes" / "planted"
            planted.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "soak-planted", str(planted)], check=True)
            next(iter(probe.cgroup_roots()), Path("/sys/fs/cgroup/memory") / parent).joinpath("planted").mkdir(parents=True)
        log(f"daemon up on {server.url}, data dir {server.data_dir}; baseline taken")
        soak = Soak(args, server, probe)
        warm_at = max(1, args.cycles // 10)
        t_cycles = time.monotonic()
        soak.run_until(warm_at)
        warm = settle(probe, baseline, args.settle_seconds)
        log(f"warm-up done: {soak.done} cycles; rss {warm['daemon_rss_kib']} KiB, fds {warm['daemon_fds']}")
        soak.run_until(args.cycles)
        cycles_seconds = time.monotonic() - t_cycles
        after = settle(probe, baseline, args.settle_seconds)
        log(f"cycles done: {soak.done} in {cycles_seconds:.1f} s; rss {after['daemon_rss_kib']} KiB, "
            f"fds {after['daemon_fds']}; errors {len(soak.errors)}, anomalies {len(soak.anomalies)}")
        result.update(warm=warm, after_cycles=after, cycles_done=soak.done,
                      cycles_seconds=round(cycles_seconds, 1),
                      stopped_early=soak.done < args.cycles, faults_seen=soak.faults_seen,
                      slowest_cycle_s=soak.max_seconds, kill_exec_interrupted=soak.kill_exec_interrupted,
                      errors=soak.errors, anomalies=soak.anomalies)
        failures = [f"after the cycles, leak {l}" for l in leaks(baseline, after)]
        rss0, rss1 = warm["daemon_rss_kib"], after["daemon_rss_kib"]
        if rss1 - rss0 > args.rss_mib * 1024 and rss1 > rss0 * (1 + args.rss_growth):
            failures.append(f"sandpitd RSS grew {rss0} -> {rss1} KiB after the warm-up")
        if after["daemon_fds"] > warm["daemon_fds"] + args.fd_slack:
            failures.append(f"sandpitd fds grew {warm['daemon_fds']} -> {after['daemon_fds']} after the warm-up")
        failures += [f"cycle error: {e}" for e in soak.errors] + [f"anomaly: {a}" for a in soak.anomalies]
        faults = run_faults(args, server, probe, baseline, registry and registry.host, images) if args.faults else []
        result["faults"] = faults
        failures += [f"fault {f['fault']} ({f['point']}): {p}" for f in faults for p in f["problems"]]
        log("faults done")
        if server.alive():
            stop_all()
        final = settle(probe, baseline, args.settle_seconds)
        result["final"] = final
        failures += [f"at the end, leak {l}" for l in leaks(baseline, final)]
        result["failures"] = failures
        ok = not failures
    except Exception as e:  # noqa: BLE001 - the harness itself broke: reported, exit 1
        traceback.print_exc()
        result.setdefault("failures", []).append(f"harness: {type(e).__name__}: {e}")
    finally:
        if server is not None and not server.alive() and server.pid:
            # The harness broke while the daemon was down (a kill -9 fault without its
            # restart): start it again on the same data dir so that it adopts and stops
            # what it left, as an operator's restart would.
            try:
                server.start()
                result.setdefault("failures", []).append("sandpitd was down when the harness ended")
                ok = False
            except Exception as e:  # noqa: BLE001
                result.setdefault("failures", []).append(f"restart at the end: {str(e)[:500]}")
                ok = False
        if server is not None and server.alive():
            try:
                stop_all()
                code = server.stop()
                if code != 0:
                    result.setdefault("failures", []).append(f"sandpitd exited {code} on SIGTERM")
                    ok = False
            except Exception as e:  # noqa: BLE001
                result.setdefault("failures", []).append(f"shutdown: {e}")
                ok = False
        if registry is not None:
            registry.stop()
        if args.self_test_leak:
            subprocess.run(["umount", str(root / "data" / "sandboxes" / "planted")], check=False)
            for d in Path("/sys/fs/cgroup").glob(f"*/{parent}/planted"):
                d.rmdir()
        if server is not None and not ok:
            swept = sweep(server, parent)
            if swept:
                result.setdefault("failures", []).append(f"swept after a failed run: {', '.join(swept)}")
        for d in Probe(server, parent, False).cgroup_roots() if server else []:
            try:
                d.rmdir()  # the parent group is never removed by the daemon; ours is ours
            except OSError as e:
                result.setdefault("failures", []).append(f"cgroup {d} not removable: {e}")
                ok = False
        log("daemon stopped")
        result["ok"] = ok
        result["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if server is not None:
            result["log_tail"] = server.log_tail(40) if not ok else ""
        keys = [k for k in result.get("baseline", {})]
        table = {k: [result.get(s, {}).get(k) for s in ("baseline", "warm", "after_cycles", "final")] for k in keys}
        print('{"columns": ["baseline", "warm", "after_cycles", "final"], "rows": {')
        print(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()) + "}}")
        summary = {k: result.get(k) for k in ("seed", "cycles_done", "cycles_seconds", "faults_seen", "slowest_cycle_s", "elapsed_s", "ok")}
        print(json.dumps(summary))
        for f in result.get("failures", []):
            print(f"soak: FAIL {f}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"soak: kept {root}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything was stopped through the API and the daemon is gone: skip the client's
    # atexit cleanup, which would retry stopping every sandbox it made against no daemon.
    os._exit(code)
