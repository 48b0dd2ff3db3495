#!/usr/bin/env python3
"""Checkpoint/fork and snapshot figures through the real client against a running sandpitd.

    CWSANDBOX_BASE_URL=http://127.0.0.1:50051 CWSANDBOX_API_KEY=... \
        .venv/bin/python scripts/bench-persistence.py [--iterations 10]

Prints, as medians and ranges over the iterations (no assertions):
  - commit of a sandbox with 10 MB of changes (100 files): the CommitSandbox round trip;
  - create of a child from that checkpoint until its first exec returned;
  - one cold start (python:3.11, create until the first exec) and 10 children of one
    checkpoint started concurrently until each answered an exec, and their ratio;
  - snapshot (sb.snapshot(), waited READY) and restore (create until first exec) of a
    scratch volume holding the same 10 MB.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import cwsandbox as cw  # noqa: E402
import sandpit_ext  # noqa: E402

WRITE = "mkdir -p /opt/w && for i in $(seq 1 100); do head -c 100000 /dev/urandom > /opt/w/f$i; done"


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def first_exec(**kw) -> tuple[float, cw.Sandbox]:
    t0 = time.perf_counter()
    sb = cw.Sandbox.run(**kw)
    sb.exec(["true"]).result(timeout=120)
    return ms(t0), sb


def show(name: str, xs: list[float]) -> None:
    print(f"{name:<48} p50 {statistics.median(xs):8.1f} ms  range {min(xs):.1f}-{max(xs):.1f}  n={len(xs)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=10)
    n = ap.parse_args().iterations
    commits, children, colds, fan, snaps, restores = [], [], [], [], [], []
    for i in range(n):
        t, sb = first_exec()
        colds.append(t)
        sb.stop().result(timeout=60)
        parent = cw.Sandbox.run()
        parent.exec(["sh", "-c", WRITE]).result(timeout=120)
        image = f"bench-fork:{i}"
        t0 = time.perf_counter()
        sandpit_ext.commit(parent.sandbox_id, image)
        commits.append(ms(t0))
        t, child = first_exec(container_image=image)
        children.append(t)
        child.stop().result(timeout=60)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            kids = list(pool.map(lambda _: first_exec(container_image=image)[1], range(10)))
        fan.append(ms(t0))
        for k in kids:
            k.stop().result(timeout=60)
        parent.stop().result(timeout=60)
        vol = [cw.ScratchVolumeOptions(name="workspace", mount_path="/workspace", size="1Gi")]
        sb = cw.Sandbox.run(volumes=vol)
        sb.exec(["sh", "-c", WRITE.replace("/opt/w", "/workspace/w")]).result(timeout=120)
        t0 = time.perf_counter()
        snap = sb.snapshot().result(timeout=120)
        snaps.append(ms(t0))
        sb.stop().result(timeout=60)
        vol = [cw.ScratchVolumeOptions(name="workspace", mount_path="/workspace", restore_from_snapshot_id=snap)]
        t, sb = first_exec(volumes=vol)
        restores.append(t)
        sb.stop().result(timeout=60)
        cw.Sandbox.delete_snapshot(snap).result(timeout=60)
    show("commit, 10 MB in 100 files", commits)
    show("child from the checkpoint: create -> first exec", children)
    show("cold start python:3.11: create -> first exec", colds)
    show("10 children concurrently, all answered", fan)
    print(f"{'10 children / one cold start (p50s)':<48} {statistics.median(fan) / statistics.median(colds):8.2f}x")
    show("snapshot of a 10 MB scratch volume (READY)", snaps)
    show("restore into a new sandbox: create -> first exec", restores)


if __name__ == "__main__":
    main()
