"""Prometheus metrics and `sandpit stats` (issue 16, item 1), through a daemon of our own.

A workload through the real cwsandbox client (creates, execs, a memory-hungry exec,
a refused create) against a `sandpitd` whose metrics listen on a free port; scrapes
during and after it, parsed with prometheus_client's text parser, must count exactly
that workload, and a stopped sandbox's series must be gone from the next scrape.
The Grafana dashboard's expressions must name only metrics a real scrape has.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from cwsandbox import ResourceOptions, Sandbox
from prometheus_client.parser import text_string_to_metric_families

from conftest import Principal, Server, free_port, import_test_images, mounts_under, sweep

RPC = 60
REPO = Path(__file__).resolve().parents[2]
HOG_MIB = 300


@pytest.fixture(scope="module")
def metrics_server(binaries, e2e_dirs, principal_a: Principal) -> Iterator[Server]:
    root = e2e_dirs.root / "metrics"
    data_dir = import_test_images(binaries, e2e_dirs.root, root / "data")
    config = root / "sandpitd.toml"
    port = free_port()
    config.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        # A second daemon on the host: the session daemon owns the network layout.
        "[network]\nenabled = false\n"
    )
    baseline_mounts = set(mounts_under(root))
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data_dir,
        keys=[principal_a.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    srv.metrics_port = port  # type: ignore[attr-defined]
    srv.start()
    yield srv
    problems = []
    try:
        sweep(srv, [principal_a])
    except AssertionError as e:
        problems.append(str(e))
    code = srv.stop()
    if code != 0:
        problems.append(f"sandpitd exited with {code}")
    leftover = [m for m in mounts_under(root) if m not in baseline_mounts]
    if leftover:
        problems.append("mounts left: " + "\n".join(leftover))
    if problems:
        e2e_dirs.keep = True
        raise AssertionError("\n".join(problems) + "\n" + srv.log_tail(80))


@pytest.fixture
def env(metrics_server: Server, principal_a: Principal, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CWSANDBOX_BASE_URL", metrics_server.url)
    monkeypatch.setenv("CWSANDBOX_API_KEY", principal_a.key)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return metrics_server


def scrape_text(srv: Server, path: str = "/metrics") -> str:
    url = f"http://127.0.0.1:{srv.metrics_port}{path}"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def scrape(srv: Server) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(scrape_text(srv)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples, name: str, **match) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == w for k, w in match.items())
    )


def stats_cli(binaries, srv: Server, key: str, *ids: str) -> list[dict]:
    proc = subprocess.run(
        [str(binaries.sandpit), "--server", srv.url, "--api-key", key,
         "stats", "--no-stream", "--json", "--interval", "0.5", *ids],
        capture_output=True, text=True, timeout=RPC,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_workload_is_counted_exactly_and_stopped_sandboxes_leave_no_series(
    env, binaries, principal_a
):
    srv = env
    n_creates, n_execs = 3, 4
    before = scrape(srv)
    boxes = [Sandbox.run(tags=["metrics-e2e"]) for _ in range(n_creates)]
    try:
        for sb in boxes:
            sb.wait(timeout=RPC)
        for i in range(n_execs):
            r = boxes[i % n_creates].exec(["sh", "-c", "echo hi"]).result(timeout=RPC)
            assert r.returncode == 0
        # A refused create: INVALID_ARGUMENT with the client's reason.
        with pytest.raises(Exception):
            Sandbox.run(resources=ResourceOptions(requests={"cpu": "lots"}, limits={"memory": "256Mi"}))

        # The memory hog holds its memory until told to stop.
        hog_box = boxes[0]
        hog = hog_box.exec([
            "python", "-c",
            f"import os, time\nb = bytearray({HOG_MIB} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            "open('/tmp/ready', 'w').close()\n"
            "while not os.path.exists('/tmp/done'): time.sleep(0.05)\n",
        ])
        polls = 0
        while True:
            polls += 1
            if hog_box.exec(["test", "-e", "/tmp/ready"]).result(timeout=RPC).returncode == 0:
                break
        during = scrape(srv)
        rows = {r["id"]: r for r in stats_cli(binaries, srv, principal_a.key)}
        hog_box.exec(["touch", "/tmp/done"]).result(timeout=RPC)
        assert hog.result(timeout=RPC).returncode == 0
        execs_started = n_execs + 1 + polls + 1  # the workload, the hog, its polls, the touch

        # During: every running sandbox has its series, the hog's memory shows.
        assert get(during, "sandpit_sandboxes", state="running") >= n_creates
        for sb in boxes:
            sid = sb.sandbox_id
            assert get(during, "sandpit_sandbox_cpu_seconds_total", sandbox_id=sid) > 0
            assert get(during, "sandpit_sandbox_memory_bytes", sandbox_id=sid) > 0
            assert get(during, "sandpit_sandbox_memory_limit_bytes", sandbox_id=sid) == 1 << 30
            assert get(during, "sandpit_sandbox_pids", sandbox_id=sid) >= 1
            row = rows[sid]
            assert row["memory_limit_bytes"] == 1 << 30
            assert 0 < row["memory_bytes"] <= row["memory_limit_bytes"]
            assert row["cpu_usage_ns"] > 0 and row["pids"] >= 1
            assert 0 <= row["cpu_percent"] <= 100 * 64
            assert "metrics-e2e" in row["tags"]
        hog_mem = get(during, "sandpit_sandbox_memory_bytes", sandbox_id=hog_box.sandbox_id)
        assert hog_mem >= HOG_MIB << 20
        assert rows[hog_box.sandbox_id]["memory_bytes"] >= HOG_MIB << 20
        assert rows[hog_box.sandbox_id]["pids"] >= 2  # the agent and the hog

        stopped = boxes[-1]
        stopped.stop().result(timeout=RPC)
        after = scrape(srv)
    finally:
        for sb in boxes:
            sb.stop(missing_ok=True).result(timeout=RPC)

    delta = lambda name, **l: total(after, name, **l) - total(before, name, **l)  # noqa: E731
    assert delta("sandpit_sandbox_creates_total", outcome="running") == n_creates
    assert delta("sandpit_sandbox_creates_total") == n_creates  # the refused one never reached it
    assert delta("sandpit_sandbox_create_duration_seconds_count") == n_creates
    assert delta("sandpit_execs_total", outcome="started") == execs_started
    assert delta("sandpit_exec_duration_seconds_count") == execs_started
    assert delta("sandpit_exec_start_duration_seconds_count") == execs_started
    assert delta(
        "sandpit_api_errors_total",
        method="SandboxService/CreateSandbox", code="InvalidArgument", reason="CWSANDBOX_INVALID_REQUEST",
    ) == 1
    # Buckets are cumulative up to +Inf, which is the count.
    assert get(after, "sandpit_exec_duration_seconds_bucket", le="+Inf") == get(
        after, "sandpit_exec_duration_seconds_count"
    )
    # The stopped sandbox's series are gone (no label growth).
    assert not [k for k in after if ("sandbox_id", stopped.sandbox_id) in k[1]]
    assert get(after, "sandpit_sandbox_memory_bytes", sandbox_id=boxes[1].sandbox_id) > 0
    assert get(after, "sandpit_build_info", version="0.1.0") == 1
    assert get(after, "process_resident_memory_bytes") > 0

    # Stats names only the caller's running sandboxes: a stopped one is refused.
    proc = subprocess.run(
        [str(binaries.sandpit), "--server", srv.url, "--api-key", principal_a.key,
         "stats", "--no-stream", "--json", stopped.sandbox_id],
        capture_output=True, text=True, timeout=RPC,
    )
    assert proc.returncode != 0 and "not running" in proc.stderr.lower(), proc.stderr


def test_only_get_metrics_is_served(env):
    for path in ["/", "/metrics/x", "/debug"]:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}{path}", timeout=30)
        assert info.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{env.metrics_port}/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 405


def test_a_bad_metrics_address_fails_the_start(binaries, tmp_path):
    proc = subprocess.run(
        [str(binaries.sandpitd), "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", "localhost"],
        capture_output=True, text=True, timeout=RPC,
    )
    assert proc.returncode == 2
    assert "metrics.listen" in proc.stderr and "localhost" in proc.stderr, proc.stderr


# Per-sandbox network series exist only for sandboxes with a network, which this
# daemon (a second one on the host) cannot give; the unit tests render them.
NETWORK_ONLY = {"sandpit_sandbox_network_receive_bytes_total", "sandpit_sandbox_network_transmit_bytes_total"}


def test_every_dashboard_expression_names_scraped_metrics(env):
    dash = json.loads((REPO / "deploy/grafana/sandpit.json").read_text())
    # At least one error and one running sandbox, whatever ran before.
    with pytest.raises(Exception):
        Sandbox.run(resources=ResourceOptions(requests={"cpu": "lots"}, limits={"memory": "256Mi"}))
    sb = Sandbox.run(tags=["metrics-e2e"])
    sb.wait(timeout=RPC)
    assert any(i["name"] == "DS_PROMETHEUS" for i in dash["__inputs"])
    names = set(NETWORK_ONLY)
    try:
        text = scrape_text(env)
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs, "the dashboard has panels"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
    functions = {"histogram_quantile", "sum", "rate", "by", "le", "topk", "job", "outcome", "state",
                 "method", "code", "reason", "sandbox_id", "__rate_interval"}
    for expr in exprs:
        for word in set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", re.sub(r'"[^"]*"', "", expr))):
            if word in functions:
                continue
            assert word in names, f"{word!r} of {expr!r} is not in a scrape"


def test_a_networked_sandbox_s_traffic_is_counted(server: Server, client_env):
    """On the session daemon (networked): bytes a sandbox sends cross its veth and are
    counted as its transmit series, its resolver's answers as receive. The traffic goes
    only to the daemon's own resolver at the sandbox's gateway (junk datagrams, then one
    lookup it answers NXDOMAIN: no name is allowed, no upstream is asked)."""
    import cwsandbox

    sb = cwsandbox.Sandbox.run(tags=["metrics-net"])
    try:
        before = scrape(server)
        assert get(before, "sandpit_sandbox_network_transmit_bytes_total", sandbox_id=sb.sandbox_id) is not None
        script = (
            "import socket\n"
            "ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]\n"
            "s = socket.socket(socket.AF_INET6 if ':' in ns else socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(1000):\n"
            "    s.sendto(b'x' * 1000, (ns, 53))\n"
            "try:\n"
            "    socket.getaddrinfo('example.com', 80)\n"
            "except OSError as e:\n"
            "    print('lookup refused', e)\n"
        )
        r = sb.exec(["python3", "-c", script], check=False).result(timeout=RPC)
        assert r.returncode == 0, r.stderr
        after = scrape(server)
        tx = [get(s, "sandpit_sandbox_network_transmit_bytes_total", sandbox_id=sb.sandbox_id) for s in (before, after)]
        rx = [get(s, "sandpit_sandbox_network_receive_bytes_total", sandbox_id=sb.sandbox_id) for s in (before, after)]
        assert tx[1] - tx[0] >= 1000 * 1000, tx
        assert rx[1] > rx[0], rx
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)
    assert get(scrape(server), "sandpit_sandbox_network_transmit_bytes_total", sandbox_id=sb.sandbox_id) is None
