"""Warm pools through the real client against a daemon of their own (networked, with
its own table, links and subnet next to the session daemon's): a create of the pool's
shape claims a pooled sandbox that ran nothing before, no pooled sandbox serves two
requests, other shapes start cold, the pool refills, a shutdown drains it and a
restart (clean or kill -9) fills it afresh without debris."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from cwsandbox import ResourceOptions, Sandbox
from prometheus_client.parser import text_string_to_metric_families

from conftest import Principal, Server, free_port, import_test_images, mounts_under, sweep

RPC = 90
POOL = "docker.io/library/python:3.11"
SIZE = 2
TABLE = "sandpit_pool_e2e"
PREFIX = "spp-"


def config_text(metrics_port: int) -> str:
    # Every listener on a port of its own: the session daemon holds the defaults.
    http_port, tls_port = free_port(), free_port()
    return f"""
[[pool]]
image = "python:3.11"
size = {SIZE}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[network]
gateway_link = "spp0"
link_prefix = "{PREFIX}"
table = "{TABLE}"
subnet_v4 = "10.211.0.0/16"
subnet_v6 = "fd5a:9d17:4e3e::/64"
dns_port = 5356
proxy_port = 3140
http_proxy_port = 3141
public_tcp_ports = "31200-31299"
public_http_listen = "127.0.0.1:{http_port}"
public_tls_listen = "127.0.0.1:{tls_port}"
upstream_dns = []
"""


def links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(PREFIX)]


def per_sandbox_nft() -> list[str]:
    out = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True)
    if out.returncode != 0:
        return []
    items = json.loads(out.stdout)["nftables"]
    names = [i.get("chain", i.get("set", {})).get("name", "") for i in items if "chain" in i or "set" in i]
    return [n for n in names if re.fullmatch(r"[a-z0-9]+_[0-9a-f]+", n)]


def sandbox_dirs(srv: Server) -> list[str]:
    root = srv.data_dir / "sandboxes"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def poold(binaries, e2e_dirs, principal_a: Principal) -> Iterator[Server]:
    root = e2e_dirs.root / "pool"
    root.mkdir()
    data = import_test_images(binaries, root, root / "data")
    config = root / "sandpitd.toml"
    port = free_port()
    config.write_text(config_text(port))
    srv = Server(binary=binaries.sandpitd, data_dir=data, keys=[principal_a.key],
                 log_path=root / "sandpitd.log", config=config)
    srv.metrics_port = port  # type: ignore[attr-defined]
    srv.start()
    yield srv
    problems = []
    if not srv.alive():
        srv.start()
    sweep(srv, [principal_a])
    code = srv.stop()
    if code != 0:
        problems.append(f"sandpitd exited with {code}")
    # Drained on shutdown: nothing of the pooled sandboxes is left.
    for what, left in [("mounts", mounts_under(root)), ("links", links()),
                       ("nftables objects", per_sandbox_nft()), ("sandbox dirs", sandbox_dirs(srv))]:
        if left:
            problems.append(f"{what} left: {left}")
    subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False)
    subprocess.run(["ip", "link", "del", "spp0"], check=False, capture_output=True)
    if problems:
        e2e_dirs.keep = True
        raise AssertionError("\n".join(problems) + "\n" + srv.log_tail(60))


@pytest.fixture
def env(poold: Server, principal_a: Principal, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("CWSANDBOX_BASE_URL", poold.url)
    monkeypatch.setenv("CWSANDBOX_API_KEY", principal_a.key)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return poold


def scrape(srv: Server) -> dict[tuple[str, tuple], float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30) as r:  # type: ignore[attr-defined]
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(srv: Server, name: str, **labels) -> float:
    return scrape(srv).get((name, tuple(sorted(labels.items()))), 0.0)


def hits(srv: Server) -> float:
    return metric(srv, "sandpit_pool_claims_total", pool=POOL, outcome="hit")


def wait_full(srv: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while metric(srv, "sandpit_pool_ready", pool=POOL) < SIZE:
        assert time.monotonic() < deadline, f"the pool did not refill:\n{srv.log_tail(30)}"
        time.sleep(0.1)


def sh(sb, script: str) -> str:
    r = sb.exec(["sh", "-c", script], check=False).result(timeout=RPC)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def test_a_create_of_the_pool_shape_claims_a_pooled_sandbox_that_ran_nothing_before(env):
    srv = env
    wait_full(srv)
    assert metric(srv, "sandpit_pool_size", pool=POOL) == SIZE
    # Holding them costs memory, and it is reported.
    assert metric(srv, "sandpit_pool_memory_bytes", pool=POOL) > 0
    before = hits(srv)
    sb = Sandbox.run("sh", "-c", "echo main-ran > /tmp/main.out; sleep 600",
                     environment_variables={"GREETING": "from-the-request"},
                     tags=["pool-e2e"])
    try:
        sb.wait(timeout=RPC)
        assert hits(srv) == before + 1
        # The request's command, environment and working dir, and a network.
        time.sleep(0.2)
        assert sh(sb, "cat /tmp/main.out") == "main-ran\n"
        assert sh(sb, "echo $GREETING") == "from-the-request\n"
        assert "nameserver" in sh(sb, "cat /etc/resolv.conf")
        assert re.search(r"inet 10\.211\.", sh(sb, "ip -4 addr show"))
        # Nothing ran in it before the claim: its processes are the agent
        # (PID 1), the main command and this exec; /tmp holds only what the main
        # command wrote; no command of anyone else is accounted to it.
        procs = dict(line.split(None, 1) for line in sh(sb, "ps -eo pid=,args=").splitlines())
        assert "sandpit-agent" in procs.pop("1"), procs
        others = [a for a in procs.values() if "ps -eo" not in a]
        assert others and all(a.startswith(("sh -c echo main-ran", "sleep 600")) for a in others), procs
        assert sh(sb, "ls -A /tmp") == "main.out\n"
        assert sh(sb, "cat /proc/sys/kernel/hostname").strip() == sb.sandbox_id
    finally:
        sb.stop().result(timeout=RPC)
    # The pool refills behind the claim.
    wait_full(srv)


def test_no_pooled_sandbox_serves_two_requests(env):
    srv = env
    wait_full(srv)
    before = hits(srv)
    boxes: list[Sandbox] = []
    errors: list[Exception] = []

    def one():
        try:
            sb = Sandbox.run(tags=["pool-e2e"])
            sb.wait(timeout=RPC)
            boxes.append(sb)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(SIZE + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        ids = [b.sandbox_id for b in boxes]
        assert len(set(ids)) == len(ids) == SIZE + 2
        assert hits(srv) - before >= SIZE, "the ready ones were taken"
        # Each sandbox is its own: a mark made in one is seen in no other.
        for b in boxes:
            sh(b, f"echo {b.sandbox_id} > /tmp/mark")
        for b in boxes:
            assert sh(b, "cat /tmp/mark") == f"{b.sandbox_id}\n"
    finally:
        for b in boxes:
            b.stop().result(timeout=RPC)
    # Stopped sandboxes never come back as pooled ones: the next claims are new ids.
    wait_full(srv)
    nxt = Sandbox.run(tags=["pool-e2e"])
    try:
        nxt.wait(timeout=RPC)
        assert nxt.sandbox_id not in ids
        assert sh(nxt, "ls -A /tmp") == ""
    finally:
        nxt.stop().result(timeout=RPC)


def test_other_shapes_start_cold_and_leave_the_pool_alone(env):
    srv = env
    wait_full(srv)
    before = scrape(srv)
    sb = Sandbox.run(resources=ResourceOptions(requests={"cpu": "250m"}, limits={"memory": "128Mi"}),
                     tags=["pool-e2e"])
    try:
        sb.wait(timeout=RPC)
        assert sh(sb, "echo ok") == "ok\n"
        after = scrape(srv)
        key = lambda o: ("sandpit_pool_claims_total", tuple(sorted({"pool": POOL, "outcome": o}.items())))
        assert after.get(key("hit"), 0) == before.get(key("hit"), 0)
        assert after.get(key("miss"), 0) == before.get(key("miss"), 0)
        assert metric(srv, "sandpit_pool_ready", pool=POOL) == SIZE
    finally:
        sb.stop().result(timeout=RPC)


def test_a_restart_drains_the_pool_and_fills_it_afresh(env):
    srv = env
    wait_full(srv)
    pooled = sandbox_dirs(srv)
    assert len(pooled) == SIZE, pooled
    # A clean stop destroys the pooled sandboxes (they have no record to adopt).
    assert srv.stop() == 0
    assert sandbox_dirs(srv) == []
    assert mounts_under(srv.data_dir / "sandboxes") == []
    assert links() == [] and per_sandbox_nft() == []
    srv.start()
    wait_full(srv)
    refilled = sandbox_dirs(srv)
    assert len(refilled) == SIZE and not set(refilled) & set(pooled)
    # kill -9: the next start sweeps the pooled ones as debris and fills again.
    srv.kill9()
    srv.start()
    wait_full(srv)
    deadline = time.monotonic() + 30
    while set(sandbox_dirs(srv)) & set(refilled) and time.monotonic() < deadline:
        time.sleep(0.1)
    now = sandbox_dirs(srv)
    assert len(now) == SIZE and not set(now) & set(refilled), (now, refilled)
    # The killed daemon's pooled sandboxes' networks went with them (the links
    # are not counted: the network keeps namespaces prepared ahead, held by the
    # daemon, whose links come and go with it).
    nets = sorted(p.stem for p in (srv.data_dir / "network").glob("*.json"))
    assert nets == now, (nets, now)
    # And it serves claims.
    before = hits(srv)
    sb = Sandbox.run(tags=["pool-e2e"])
    try:
        sb.wait(timeout=RPC)
        assert hits(srv) == before + 1
        assert sb.sandbox_id in now
    finally:
        sb.stop().result(timeout=RPC)
