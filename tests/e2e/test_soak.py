"""The soak harness's quick mode (scripts/soak.py --quick): no leak, no fault left behind.

40 create/exec/delete cycles on 4 threads with random faults, then 3 kill -9s of
sandpitd (one during a create, a delete and an image pull) each followed by a restart
on the same data dir. The harness runs a daemon of its own (no networking, its
own cgroup parent), so this test needs nothing of the session daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Binaries, E2EDirs


def _soak(binaries: Binaries, e2e_dirs: E2EDirs, out, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SANDPITD_BIN": str(binaries.sandpitd),
        "SANDPIT_BIN": str(binaries.sandpit),
        "SANDPIT_E2E_TMP": str(e2e_dirs.root),
    }
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )


@pytest.mark.timeout(300)
def test_quick_soak_leaks_nothing(binaries: Binaries, e2e_dirs: E2EDirs):
    out = e2e_dirs.root / "soak.json"
    proc = _soak(binaries, e2e_dirs, out, "--quick")
    report = json.loads(out.read_text()) if out.exists() else {}
    detail = "\n".join(report.get("failures", [])) or proc.stderr[-4000:]
    assert proc.returncode == 0, f"soak --quick exited {proc.returncode}:\n{detail}\n{proc.stdout[-3000:]}"
    assert report["ok"] is True
    # It really soaked: cycles ran (with faults among them) and both kills happened.
    assert report["cycles_done"] >= 20, report["cycles_done"]
    assert sum(n for f, n in report["faults_seen"].items() if f != "none") > 0
    assert sorted(f["point"] for f in report["faults"] if f["ok"]) == ["create", "delete", "pull"], report["faults"]
    for key in ("mounts", "cgroup_dirs", "cgroup_procs", "loop_devices", "records_live"):
        assert report["final"][key] <= report["baseline"][key], key


@pytest.mark.timeout(120)
def test_the_soak_fails_on_a_planted_leak(binaries: Binaries, e2e_dirs: E2EDirs):
    """The leak check can fail: a mount and a cgroup planted after the baseline are caught."""
    out = e2e_dirs.root / "soak-planted.json"
    proc = _soak(binaries, e2e_dirs, out, "--cycles", "4", "--concurrency", "2", "--faults", "0",
                 "--self-test-leak", "--settle-seconds", "3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    failures = json.loads(out.read_text())["failures"]
    assert "at the end, leak mounts: 0 -> 1" in failures, failures
    assert "at the end, leak cgroup_dirs: 0 -> 1" in failures, failures
    assert "soak-planted" not in Path("/proc/self/mountinfo").read_text(), "the harness unmounts it"
