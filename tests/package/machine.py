"""A booted Debian bookworm with systemd as PID 1, for the package test.

The host that runs the tests need not run systemd (CI's does not), so the
package is installed into a machine of its own: a minimal bookworm rootfs
(mmdebstrap, cached under .cache/package/ by its recipe), booted with
`systemd-nspawn --boot` in a private network namespace (the e2e session's
daemon owns the host's sandbox network; this one builds its own bridge and
firewall in the machine's namespace), and driven from the host with
`nsenter` into the machine's namespaces.

What the machine lacks that a real host has is supplied at boot by one unit
of the test's own (`sandpit-test-host.service`), never by the package:
- udev's device nodes: nspawn's /dev is a small tmpfs, so the loop devices
  the daemon attaches writable layers to are made with mknod;
- writable cgroup controllers: nspawn mounts the v1 controller hierarchies
  read-only (a host's are writable to root), so they are remounted
  read-write. With a cgroup namespace their root is the machine's own
  group, which this harness creates below its own and removes afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "package"

# systemd to boot; the package's dependencies and recommendations (the
# machine has no network, so apt cannot fetch them at install time).
PACKAGES = "systemd,systemd-sysv,dbus,e2fsprogs,nftables,iproute2,lxcfs,logrotate,procps"
RECIPE = f"bookworm minbase {PACKAGES}"

TEST_HOST_UNIT = """\
[Unit]
Description=What a real host has and this machine lacks (loop nodes, writable cgroups)
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for i in $(seq 0 255); do [ -e /dev/loop$i ] || mknod -m 0660 /dev/loop$i b 7 $i; done'
ExecStart=/bin/sh -c 'for d in /sys/fs/cgroup/*/; do mount -o remount,bind,rw "$d"; done'

[Install]
WantedBy=sysinit.target
"""


def rootfs_tar() -> Path:
    """The machine's rootfs tarball, built (about a minute) when missing or stale."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / "bookworm-systemd.tar"
    recipe = CACHE / "bookworm-systemd.recipe"
    if tar.is_file() and recipe.is_file() and recipe.read_text() == RECIPE:
        return tar
    tmp = CACHE / f"bookworm-systemd.{os.getpid()}.tar"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp)],
        check=True,
        timeout=900,
    )
    tmp.rename(tar)
    recipe.write_text(RECIPE)
    return tar


def _hierarchies() -> list[tuple[Path, str]]:
    """(mount point, own group) of every cgroup hierarchy, from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, options = right.split(" ")[:3]
        mount_point = left.split(" ")[4]
        if fstype == "cgroup2":
            out.append((Path(mount_point), own.get("", "/")))
        elif fstype == "cgroup":
            opts = options.split(",")
            for key, path in own.items():
                if key and set(key.split(",")) <= set(opts):
                    out.append((Path(mount_point), path))
                    break
    return out


class Machine:
    """One booted machine; `start()` then `sh(...)`; `stop()` leaves nothing."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.root = workdir / "root"
        self.name = name
        self.log_path = workdir / "nspawn.log"
        self.groups: list[Path] = []
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None

    # ------------------------------------------------------------------ life

    def start(self, files: dict[str, Path]) -> None:
        """Unpacks the rootfs, copies `files` (machine path -> host file) in, boots."""
        self.root.mkdir(parents=True)
        with tarfile.open(rootfs_tar()) as tf:
            tf.extractall(self.root, filter="fully_trusted")
        unit = self.root / "etc/systemd/system/sandpit-test-host.service"
        unit.write_text(TEST_HOST_UNIT)
        wants = self.root / "etc/systemd/system/sysinit.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit.name).symlink_to("../sandpit-test-host.service")
        for dest, src in files.items():
            target = self.root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        self._make_groups()
        log = self.log_path.open("wb")
        groups = [g / "cgroup.procs" for g in self.groups]

        def join_groups() -> None:
            for procs in groups:
                procs.write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--boot",
                f"--directory={self.root}",
                f"--machine={self.name}",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=passive",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
                "--bind=/dev/fuse",
                "--bind=/dev/loop-control",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=join_groups,
            start_new_session=True,
        )
        log.close()
        self.leader = self._find_leader()
        self._wait_booted()

    def stop(self) -> None:
        """Shuts the machine down (forcibly if it must), then removes its groups and root."""
        if self.proc is not None and self.proc.poll() is None:
            if self.leader is not None:
                # systemd's "halt": SIGRTMIN+4 is poweroff for a container's PID 1.
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._kill_groups()
        self._remove_groups()
        if self.root.exists():
            mounted = [m for m in _mount_points() if m == self.root or self.root in m.parents]
            assert not mounted, f"mounts left below the machine's root: {mounted}"
            shutil.rmtree(self.root)

    # ------------------------------------------------------------------ use

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs `script` with /bin/sh inside the machine (all its namespaces)."""
        assert self.leader is not None
        proc = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
             "--", "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
             "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the machine, exit {proc.returncode}: {script}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def in_netns(self, argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
        """Runs a host program (e.g. the host's Python client) in the machine's network namespace only."""
        assert self.leader is not None
        return subprocess.run(
            ["nsenter", f"--target={self.leader}", "--net", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ internals

    def _make_groups(self) -> None:
        for mount_point, own in _hierarchies():
            group = mount_point / own.lstrip("/") / f"sandpit-pkgtest-{os.getpid()}"
            group.mkdir(exist_ok=True)
            # A v1 cpuset group starts with no CPUs and no memory nodes.
            for key in ("cpuset.cpus", "cpuset.mems"):
                if (group / key).exists() and not (group / key).read_text().strip():
                    (group / key).write_text((group.parent / key).read_text())
            self.groups.append(group)

    def _find_leader(self) -> int:
        """The machine's PID 1: a process of our groups whose pid namespace is not ours."""
        own_ns = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.log()}")
            for pid in _group_pids(self.groups):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    ns = os.readlink(f"/proc/{pid}/ns/pid")
                except OSError:
                    continue
                nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
                if ns != own_ns and nspid[-1:] == ["1"]:
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"the machine's PID 1 did not appear:\n{self.log()}")

    def _wait_booted(self) -> None:
        # `is-system-running --wait` returns once boot finished: "running",
        # or "degraded" when some unit failed (the log is then in the report).
        # Before PID 1 opens its socket there is no bus to ask: retry.
        deadline = time.monotonic() + 120
        while True:
            proc = self.sh("systemctl is-system-running --wait", check=False, timeout=180)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline or (state and state != "starting"):
                raise AssertionError(f"the machine did not boot ({state!r}, {proc.stderr!r}):\n{self.log()}")
            time.sleep(0.2)

    def _kill_groups(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            pids = _group_pids(self.groups)
            if not pids:
                return
            assert time.monotonic() < deadline, f"processes survived SIGKILL: {sorted(pids)}"
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def _remove_groups(self) -> None:
        for group in self.groups:
            if not group.exists():
                continue
            for dirpath, _, _ in sorted(os.walk(group), key=lambda t: -t[0].count("/")):
                os.rmdir(dirpath)
        self.groups = []


def _group_pids(groups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for group in groups:
        for dirpath, _, filenames in os.walk(group):
            if "cgroup.procs" in filenames:
                try:
                    text = Path(dirpath, "cgroup.procs").read_text()
                except OSError:
                    continue
                pids.update(int(p) for p in text.split())
    return pids


def _mount_points() -> list[Path]:
    return [Path(line.split(" ")[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]
