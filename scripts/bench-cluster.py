#!/usr/bin/env python3
"""The gateway benchmark (issue 18): the cost of the gateway hop, through the real client.

As root, from the repository root, with target/release/sandpitd and sandpit built:

    flock /run/sandpit-e2e.lock .venv/bin/python scripts/bench-cluster.py [--quick] [--json FILE]

It builds the multi-runner e2e topology once (tests/e2e/cluster: PostgreSQL, three
runners in network namespaces, gateways on loopback) and measures four
configurations in the same run, interleaved a, b, c, d, a, b, c, d, ...:

  a  direct    one runner (r1) called at its own endpoint, no gateway; r1 is still a
               registered cluster runner, so the only difference to b is the gateway hop;
  b  gw->1     gateway gw1, every create pinned to r1 (`runner_ids=["r1"]`);
  c  gw->3     gateway gw1, creates spread over r1, r2 and r3 (no pin);
  d  gw+direct  as b, with the client's direct data plane (DataPlaneMode DIRECT):
               exec, files and logs go over mTLS to r1's direct endpoint with a
               ConnectSandbox certificate from gw1; the control calls go to gw1.

a, b and c use the client's GATEWAY mode (every call to base_url).

a and b both pass `runner_ids=["r1"]` (a runner accepts a pin to itself), so their
requests are the same bytes; b and c land on the same r1 process, data dir and warm
caches as a. Per configuration and round (no assertions):

  first_exec   N sequential `Sandbox.run()` + first `exec(["true"])` returning, wall
               time: p50, p90, min (each sandbox is stopped afterwards, untimed);
  creates/s    B bursts of M creates from C threads until each is RUNNING (`wait()`),
               all stopped after each burst (untimed); B*M / the bursts' wall time;
  exec_rtt     E execs of `true` one after the other on one running sandbox: p50;
  get_rtt      then E `get_status()` calls (one unary GetSandbox each) on it: p50.

Before the rounds it prints the RPCs the client makes for one create + first exec
(a counting interceptor on those channels only, untimed).

The table shows the median over rounds and the range of the per-round values; the
ratios are gateway / direct from the same run. Teardown is the harness's
(`Cluster.close`), on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
os.environ.pop("CWSANDBOX_BASE_URL", None)  # it would override SandboxDefaults(base_url=...)

import conftest as e2e  # noqa: E402  tests/e2e/conftest.py, as the harness expects
from cluster.cluster import RUNNER_IDS, Cluster  # noqa: E402

from cwsandbox import Sandbox, SandboxDefaults  # noqa: E402



IMAGE = e2e.IMAGE_REFERENCES[0]  # python:3.11, the e2e image (imported into every runner)
RPC = 120


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Config:
    def __init__(self, key: str, label: str, url: str, pins: list[str] | None, data_plane: str = "gateway"):
        self.key, self.label, self.url, self.pins, self.data_plane = key, label, url, pins, data_plane


class Bench:
    def __init__(self, cluster: Cluster, principal: e2e.Principal, tag: str):
        self.cluster, self.principal, self.tag = cluster, principal, tag

    def run(self, cfg: Config) -> Sandbox:
        return Sandbox.run(
            container_image=IMAGE,
            defaults=SandboxDefaults(base_url=cfg.url, data_plane_mode=cfg.data_plane),
            auth=self.principal.bearer,
            tags=[self.tag],
            runner_ids=cfg.pins,
        )

    @staticmethod
    def stop(boxes: list[Sandbox]) -> None:
        refs = [b.stop(graceful_shutdown_seconds=1, missing_ok=True) for b in boxes]
        for r in refs:
            r.result(timeout=RPC)

    def first_exec(self, cfg: Config, n: int) -> dict:
        times, runners = [], {}
        for _ in range(n):
            t0 = time.perf_counter()
            sb = self.run(cfg)
            sb.exec(["true"]).result(timeout=RPC)
            times.append(ms(t0))
            rid = sb.runner_id or "?"
            runners[rid] = runners.get(rid, 0) + 1
            self.stop([sb])
        return {"p50": statistics.median(times), "p90": pct(times, 0.9), "min": min(times),
                "samples_ms": [round(t, 2) for t in times], "runners": runners}

    def creates(self, cfg: Config, total: int, workers: int, bursts: int) -> dict:
        """`bursts` times: `total` creates from `workers` threads until each is RUNNING,
        then all stopped (untimed). creates/s = all creates / the bursts' summed wall time."""

        def one(_: int) -> tuple[Sandbox, float]:
            t0 = time.perf_counter()
            sb = self.run(cfg)
            sb.wait(timeout=RPC)
            return sb, ms(t0)

        walls: list[float] = []
        each: list[float] = []  # each create's own time to RUNNING, ms
        runners: dict[str, int] = {}
        for _ in range(bursts):
            boxes: list[Sandbox] = []
            errors: list[str] = []
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(one, i) for i in range(total)]:
                    try:
                        sb, t = f.result()
                        boxes.append(sb)
                        each.append(t)
                    except Exception as e:  # noqa: BLE001 - reported, and the run fails
                        errors.append(f"{type(e).__name__}: {e}")
            walls.append(time.perf_counter() - t0)
            for b in boxes:
                runners[b.runner_id or "?"] = runners.get(b.runner_id or "?", 0) + 1
            self.stop(boxes)
            if errors:
                raise RuntimeError(f"{cfg.label}: {len(errors)} of {total} creates failed: {errors[:3]}")
        return {"per_s": total * bursts / sum(walls), "burst_walls_s": [round(w, 4) for w in walls],
                "each_p50_ms": statistics.median(each), "each_max_ms": max(each), "runners": runners}

    def call_rtt(self, cfg: Config, n: int) -> tuple[dict, dict]:
        """On one running sandbox: n execs of `true`, then n `get_status()` (one unary
        GetSandbox each), one after the other: their p50s."""
        sb = self.run(cfg)
        try:
            sb.exec(["true"]).result(timeout=RPC)  # connected and warm, untimed
            sb.get_status()
            execs, gets = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                sb.exec(["true"]).result(timeout=RPC)
                execs.append(ms(t0))
            for _ in range(n):
                t0 = time.perf_counter()
                sb.get_status()
                gets.append(ms(t0))
        finally:
            self.stop([sb])
        summary = lambda xs: {"p50": statistics.median(xs), "p90": pct(xs, 0.9), "min": min(xs)}  # noqa: E731
        return summary(execs), summary(gets)

    def calls(self, cfg: Config) -> list[str]:
        """The RPCs the client makes for one create + first exec (untimed; a counting
        interceptor on the channels created meanwhile)."""
        import cwsandbox._sandbox as impl
        import grpc

        seen: list[str] = []

        def note(details) -> None:
            m = details.method
            seen.append((m.decode() if isinstance(m, bytes) else m).rsplit("/", 1)[-1])

        # One object per kind: grpc.aio files each interceptor under the first kind it is.
        class UU(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                note(details)
                return await continuation(details, request)

        class US(grpc.aio.UnaryStreamClientInterceptor):
            async def intercept_unary_stream(self, continuation, details, request):
                note(details)
                return await continuation(details, request)

        class SU(grpc.aio.StreamUnaryClientInterceptor):
            async def intercept_stream_unary(self, continuation, details, requests):
                note(details)
                return await continuation(details, requests)

        class SS(grpc.aio.StreamStreamClientInterceptor):
            async def intercept_stream_stream(self, continuation, details, requests):
                note(details)
                return await continuation(details, requests)

        original = impl.create_channel

        def counting(target, is_secure, **kw):
            assert not is_secure and not kw
            from cwsandbox._network import _default_channel_options

            return grpc.aio.insecure_channel(target, options=_default_channel_options(),
                                             interceptors=[UU(), US(), SU(), SS()])
        # The direct data plane's mTLS channel is the client's own (cwsandbox._direct):
        # its calls are not counted; the ConnectSandbox that precedes them is.

        impl.create_channel = counting
        try:
            sb = self.run(cfg)
            sb.exec(["true"]).result(timeout=RPC)
            calls = list(seen)
        finally:
            impl.create_channel = original
        self.stop([sb])
        return calls


def git_rev() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "crates"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return rev + (" (crates/ has uncommitted changes)" if dirty else "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def binary_info(path: Path) -> str:
    st = path.stat()
    return f"{path.relative_to(REPO)} built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))}"


METRICS = [  # (result key, field, label, unit)
    ("first_exec", "p50", "create -> first exec p50", "ms"),
    ("first_exec", "p90", "create -> first exec p90", "ms"),
    ("first_exec", "min", "create -> first exec min", "ms"),
    ("creates", "per_s", "creates/s", "/s"),
    ("exec_rtt", "p50", "exec `true` round trip p50", "ms"),
    ("get_rtt", "p50", "get_status round trip p50", "ms"),
]


def summarize(results: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for key, rounds in results.items():
        out[key] = {}
        for metric, field, _label, _unit in METRICS:
            vals = [r[metric][field] for r in rounds]
            out[key][f"{metric}.{field}"] = {
                "median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": vals,
            }
    return out


def table(summary: dict, configs: list[Config]) -> str:
    keys = [c.key for c in configs]
    others = [k for k in keys if k != "a"]
    head = "| measure | " + " | ".join(c.label for c in configs) + " | " + " | ".join(f"{k}/a" for k in others) + " |"
    lines = [head, "| --- |" + " ---: |" * (len(configs) + len(others))]
    for metric, field, label, unit in METRICS:
        m = f"{metric}.{field}"
        cells = []
        for k in keys:
            s = summary[k][m]
            fmt = "{:.2f}" if metric.endswith("_rtt") else "{:.1f}"
            cells.append(f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])}) {unit}")
        a = summary["a"][m]["median"]
        ratios = [f"{summary[k][m]['median'] / a:.2f}" if a else "-" for k in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds of a, b, c, d (default 3; --quick 1)")
    ap.add_argument("--first-exec", type=int, default=None, help="N sequential creates per round (50; quick 4)")
    ap.add_argument("--creates", type=int, default=None, help="M concurrent creates per round (32; quick 8)")
    ap.add_argument("--bursts", type=int, default=None, help="bursts of M creates per round (4; quick 1)")
    ap.add_argument("--workers", type=int, default=8, help="C threads for the concurrent creates")
    ap.add_argument("--execs", type=int, default=None, help="E sequential execs per round (100; quick 20)")
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args()
    q = args.quick
    rounds = args.rounds or (1 if q else 3)
    n_first = args.first_exec or (4 if q else 50)
    bursts = args.bursts or (1 if q else 4)
    n_creates = args.creates or (8 if q else 32)
    n_execs = args.execs or (20 if q else 100)
    if n_creates + 2 > 40:  # r1 takes every create of a and b: its cap (RUNNER_CAP) binds
        print("--creates must stay below r1's cap (40) minus 2", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root (network namespaces, cgroups)", file=sys.stderr)
        return 2

    binaries = e2e.Binaries(sandpitd=REPO / "target/release/sandpitd", sandpit=REPO / "target/release/sandpit")
    header = {
        "command": shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable, *sys.argv]),
        "machine": f"{os.cpu_count()} CPUs (nproc), kernel {platform.release()}, {platform.machine()}",
        "git_rev": git_rev(),
        "binary": binary_info(binaries.sandpitd),
        "image": IMAGE,
        "rounds": rounds, "first_exec_n": n_first, "creates_m": n_creates, "bursts": bursts, "workers": args.workers,
        "execs_e": n_execs,
    }
    print(f"command: {header['command']}")
    header["loadavg_start"] = loadavg()
    print(f"machine: {header['machine']}; load average {header['loadavg_start']} (1, 5, 15 min)")
    print(f"sandpitd: git {header['git_rev']}; {header['binary']}")
    print(f"image {IMAGE}; {rounds} rounds of a, b, c, d; first exec N={n_first}, "
          f"creates {bursts} x M={n_creates} with C={args.workers} threads, execs E={n_execs}", flush=True)

    principal = e2e.Principal("a", e2e._new_key("a"))
    other = e2e.Principal("b", e2e._new_key("b"))
    cluster = Cluster(binaries, [principal.key, other.key])
    problems: list[str] = []

    def on_term(signum, frame):  # SIGTERM as Ctrl-C: through the finally below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    status = 1
    try:
        t0 = time.monotonic()
        cluster.start(principal)
        print(f"cluster up in {time.monotonic() - t0:.1f} s at {cluster.root}: {cluster.timings}", flush=True)
        r1, gw = cluster.runners["r1"], cluster.gateway
        configs = [
            Config("a", "a: r1 direct", r1.url, ["r1"]),
            Config("b", "b: gw -> r1", gw.url, ["r1"]),
            Config("c", "c: gw -> r1-r3", gw.url, None),
            Config("d", "d: gw + direct r1", gw.url, ["r1"], data_plane="direct"),
        ]
        bench = Bench(cluster, principal, f"bench-cluster-{secrets.token_hex(3)}")

        # Warm-up, untimed: the image's first use on every runner, each endpoint's first call.
        t0 = time.monotonic()
        warm = [Config("w", f"warm {rid}", gw.url, [rid]) for rid in RUNNER_IDS] + configs
        for cfg in warm:
            bench.first_exec(cfg, 1)
        print(f"warm-up (a create per runner and per configuration) {time.monotonic() - t0:.1f} s", flush=True)
        calls = {c.key: bench.calls(c) for c in configs}
        for c in configs:
            print(f"RPCs of one create + first exec, {c.label}: {', '.join(calls[c.key])}", flush=True)

        results: dict[str, list[dict]] = {c.key: [] for c in configs}
        for r in range(1, rounds + 1):
            for cfg in configs:
                t0 = time.monotonic()
                res = {
                    "first_exec": bench.first_exec(cfg, n_first),
                    "creates": bench.creates(cfg, n_creates, args.workers, bursts),
                }
                res["exec_rtt"], res["get_rtt"] = bench.call_rtt(cfg, n_execs)
                results[cfg.key].append(res)
                fe, cr, ex = res["first_exec"], res["creates"], res["exec_rtt"]
                print(
                    f"round {r} {cfg.label:<16} first exec p50 {fe['p50']:7.1f} ms p90 {fe['p90']:7.1f} "
                    f"min {fe['min']:7.1f} | {cr['per_s']:5.1f} creates/s (each p50 {cr['each_p50_ms']:.0f} "
                    f"max {cr['each_max_ms']:.0f} ms) {cr['runners']} | "
                    f"exec p50 {ex['p50']:5.2f} ms | get p50 {res['get_rtt']['p50']:5.2f} ms | "
                    f"{time.monotonic() - t0:.0f} s",
                    flush=True,
                )

        summary = summarize(results)
        header["loadavg_end"] = loadavg()
        print(f"load average at the end {header['loadavg_end']}: anything else busy on this host "
              "(a cargo build) shows here and in the ranges")
        print()
        print(table(summary, configs))
        print()
        print("medians over rounds (range of the per-round values); x/a: ratio of the medians")
        if args.json:
            args.json.write_text(json.dumps(
                {"header": header, "configs": {c.key: c.label for c in configs}, "calls": calls,
                 "rounds": results, "summary": summary}, indent=2) + "\n")
            print(f"wrote {args.json}")
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the cluster down", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - reported with the daemons' logs
        print(f"\nfailed: {type(e).__name__}: {e}", file=sys.stderr)
        for name, text in cluster.logs(20):
            print(f"--- {name} ---\n{text}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        principals = [principal, other]
        # Direct creates are r1's own (the store never saw them): sweep every runner
        # directly first, then the harness's teardown (its sweep goes through a gateway).
        for rid, d in cluster.runners.items():
            if d.alive():
                try:
                    e2e.sweep(d, principals)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"sweep {rid} directly: {type(e).__name__}: {e}")
        problems += cluster.close(principals)
        if problems:
            print("teardown found:\n" + "\n".join(problems), file=sys.stderr)
            if cluster.keep:
                print(f"kept {cluster.root}", file=sys.stderr)
            status = status or 1
        else:
            print("cluster torn down cleanly", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
