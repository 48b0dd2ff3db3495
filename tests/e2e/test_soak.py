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

import pytest

from conftest import REPO_ROOT, Binaries, E2EDirs


@pytest.mark.timeout(300)
def test_quick_soak_leaks_nothing(binaries: Binaries, e2e_dirs: E2EDirs):
    out = e2e_dirs.root / "soak.json"
    env = {
        **os.environ,
        "SANDPITD_BIN": str(binaries.sandpitd),
        "SANDPIT_BIN": str(binaries.sandpit),
        "SANDPIT_E2E_TMP": str(e2e_dirs.root),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
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
