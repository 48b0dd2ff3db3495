"""Issue 12: sandboxes on a real network, through the real clients.

A daemon of its own (`netd`), configured like a runner behind which the "internet" is
the upstream namespace of `upstream.py` (DNS, HTTP, HTTPS with a private CA, a PEP 503
index with real wheels, echo servers on 198.51.100.2): its resolver forwards there,
its default egress is "deny", and the runner carve-out `blocked.wild.test` holds
whatever a sandbox is granted. Its network is laid out apart from the session
daemon's (own gateway link, link prefix, subnet, nftables table and ports), so the
two never touch each other's sandboxes.

Traffic goes only to loopback, to the upstream namespace and to the sandboxes'.
At the end the module asserts that nothing of any sandbox network is left: no link
with the daemon's prefix, no per-sandbox chain or set, no remembered allocation.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import (
    Server,
    all_sandbox_ids,
    client_api,
    free_port,
    import_test_images,
    mounts_under,
    sandpit_cgroup_procs,
    sweep,
)
from upstream import HOST_ADDR, UP_ADDR, Upstream

RPC = 90  # seconds: bound on any single client operation's .result()
TABLE = "sandpit_e2e"
PREFIX = "spn-"
GATEWAY = "10.210.0.1"
NET_CONFIG = f"""
[network]
gateway_link = "spn0"
link_prefix = "{PREFIX}"
table = "{TABLE}"
subnet_v4 = "10.210.0.0/16"
subnet_v6 = "fd5a:9d17:4e3d::/64"
dns_port = 5354
proxy_port = 3130
http_proxy_port = 3131
dns_name_except = ["blocked.wild.test"]
public_tcp_ports = "31000-31099"
"""
# A pure-Python wheel without dependencies, fetched on the host at module start.
PACKAGE = "six"


def sh(sb, script: str, timeout: float = RPC):
    return sb.exec(["sh", "-c", script], check=False).result(timeout=timeout)


def nft_objects() -> tuple[list[str], list[str]]:
    """(chains, sets) of the test daemon's table (empty lists when it does not exist)."""
    out = subprocess.run(
        ["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True
    )
    if out.returncode != 0:
        return [], []
    items = json.loads(out.stdout)["nftables"]
    chains = [i["chain"]["name"] for i in items if "chain" in i]
    sets = [i["set"]["name"] for i in items if "set" in i]
    return chains, sets


def sandbox_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [
        line.split(":")[1].strip().split("@")[0]
        for line in out.splitlines()
        if line.split(":")[1].strip().startswith(PREFIX)
    ]


def per_sandbox_objects() -> list[str]:
    # Per-sandbox chains and sets carry the slot's offset in hex (`eg_2a`, `eg4a_2a`);
    # the base ones have no such suffix.
    chains, sets = nft_objects()
    return [n for n in chains + sets if re.fullmatch(r"[a-z0-9]+_[0-9a-f]+", n)]


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    up = Upstream.start(packages=[PACKAGE])
    yield up
    up.close()


@pytest.fixture(scope="module")
def netd(binaries, e2e_dirs, principal_a, principal_b, upstream):
    root = e2e_dirs.root / "net"
    root.mkdir()
    data = import_test_images(binaries, root, root / "data")
    config = root / "sandpitd.toml"
    http_port, tls_port = free_port(), free_port()
    config.write_text(
        NET_CONFIG
        + f'upstream_dns = ["{upstream.dns}"]\n'
        + f'public_http_listen = "127.0.0.1:{http_port}"\n'
        + f'public_tls_listen = "127.0.0.1:{tls_port}"\n'
        # The upstream's private CA plays a TLS-inspecting proxy's, and its index
        # the site's package mirror: what a runner behind a proxy configures.
        + f'ca_certificates = ["{upstream.ca_pem}"]\n'
        + '[network.env]\nPIP_INDEX_URL = "https://pypi.test/simple/"\n'
    )
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data,
        keys=[principal_a.key, principal_b.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    srv.public_http_port = http_port
    srv.start()
    yield srv
    problems = []
    if not srv.alive():
        srv.start()
    sweep(srv, [principal_a, principal_b])
    ids = all_sandbox_ids(srv, [principal_a, principal_b])
    code = srv.stop()
    if code != 0:
        problems.append(f"sandpitd exited with {code}")
    # As the session's check does for its daemon: no process left in a
    # cgroup of this daemon's sandboxes, no mount under its data dir.
    deadline = time.monotonic() + 15
    while True:
        leaked = {p: c for p, c in sandpit_cgroup_procs().items()
                  if any(i in c.split("/") for i in ids)}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leaked:
        problems.append(f"processes left in sandbox cgroups: {leaked}")
    if mounts_under(root):
        problems.append(f"mounts left: {mounts_under(root)}")
    if sandbox_links():
        problems.append(f"links left: {sandbox_links()}")
    if per_sandbox_objects():
        problems.append(f"nftables objects left: {per_sandbox_objects()}")
    left = list((data / "network").glob("*.json"))
    if left:
        problems.append(f"allocations left: {left}")
    if not problems:
        # The daemon's own host side (table, gateway link) stays after it stops,
        # for the next start, as Docker's does; the test host gets it back.
        subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False)
        subprocess.run(["ip", "link", "del", "spn0"], check=False)
    if problems:
        e2e_dirs.keep = True
        raise AssertionError("\n".join(problems) + "\n" + srv.log_tail(60))


@pytest.fixture
def net_env(netd, principal_a, e2e_dirs, monkeypatch):
    """Points both clients at the networking daemon as principal A."""
    from conftest import _client_env_values

    for name, value in _client_env_values(netd, principal_a, e2e_dirs.root).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["cwsandbox", "wandb.sandbox"])
def nsdk(request, net_env):
    """The client API as users import it, pointed at the networking daemon."""
    with client_api(request.param) as module:
        yield module


@pytest.fixture
def started(nsdk, netd, principal_a, request):
    """Runs sandboxes on the networking daemon that are stopped after the test."""
    boxes = []

    def start(*args, **kwargs):
        sb = nsdk.Sandbox.run(*args, **kwargs)
        boxes.append(sb)
        return sb

    yield start
    for sb in boxes:
        try:
            sb.stop(graceful_shutdown_seconds=1, missing_ok=True).result(timeout=RPC)
        except Exception:  # noqa: BLE001 - the module's sweep retries
            pass


def address_of(sb) -> str:
    out = sh(sb, "ip -4 -o addr show eth0").stdout.split()
    return out[out.index("inet") + 1].split("/")[0]


def curl(sb, url: str, *extra: str) -> subprocess.CompletedProcess:
    # No --cacert: the runner's extra CA is in the sandbox's bundle.
    return sh(sb, f"curl -sS -m 8 {' '.join(extra)} {url}")


def test_a_sandbox_gets_its_own_network_and_the_runner_default_denies(started, upstream):
    sb = started()
    r = sh(sb, "cat /etc/resolv.conf; ip -o addr show eth0; ip route; cat /etc/hosts")
    assert f"nameserver {GATEWAY}" in r.stdout
    assert "inet 10.210." in r.stdout and "inet6 fd5a:9d17:4e3d::" in r.stdout, r.stdout
    assert f"default via {GATEWAY}" in r.stdout
    assert sb.sandbox_id in r.stdout  # its own name in /etc/hosts
    # Nothing leaves: not by address, not by name.
    assert sh(sb, f"curl -sS -m 3 http://{UP_ADDR}/hello.txt").returncode != 0
    r = sh(sb, "getent hosts files.test")
    assert r.returncode != 0 and r.stdout == ""


def test_pip_install_succeeds_with_a_grant_and_fails_fast_without(started, upstream):
    # No --index-url, no --cert: the runner's mirror (PIP_INDEX_URL) and CA come
    # from its config.
    index = ["--no-deps", "--retries", "0", "--timeout", "5", PACKAGE]
    import cwsandbox as c

    granted = started(network=c.NetworkOptions(egress=[c.EgressRule(dns_name="pypi.test")]))
    denied = started()
    env = sh(granted, "echo $PIP_INDEX_URL $REQUESTS_CA_BUNDLE").stdout.split()
    assert env == ["https://pypi.test/simple/", "/etc/ssl/certs/ca-certificates.crt"]
    r = granted.exec(["pip", "install", *index], check=False).result(timeout=RPC)
    assert r.returncode == 0, r.stderr
    assert sh(granted, f"python -c 'import {PACKAGE}; print({PACKAGE}.__name__)'").stdout.strip() == PACKAGE
    t = time.monotonic()
    r = denied.exec(["pip", "install", *index], check=False).result(timeout=RPC)
    elapsed = time.monotonic() - t
    assert r.returncode != 0
    assert "pypi.test" in r.stdout + r.stderr
    # Fast: a name that does not resolve, not a connection left to time out.
    print(f"denied pip install failed after {elapsed:.1f}s")


def test_name_grants_wildcards_and_the_runners_carve_out(started, upstream):
    import cwsandbox as c

    sb = started(network=c.NetworkOptions(egress=[
        c.EgressRule(dns_name="api.test"), c.EgressRule(dns_name="*.wild.test")]))
    assert curl(sb, "https://api.test/hello.txt").stdout == "hello from upstream\n"
    assert curl(sb, "https://a.wild.test/hello.txt").stdout == "hello from upstream\n"
    # A name without a grant does not resolve...
    r = curl(sb, "https://files.test/hello.txt")
    assert r.returncode == 6, r.stderr  # CURLE_COULDNT_RESOLVE_HOST
    # ...and naming it over a granted address does not get through the proxy either.
    r = curl(sb, "https://files.test/hello.txt", "--resolve", f"files.test:443:{UP_ADDR}")
    assert r.returncode != 0 and "hello" not in r.stdout
    # The runner's carve-out wins over the wildcard, in DNS and in the proxy.
    assert curl(sb, "https://blocked.wild.test/hello.txt").returncode == 6
    r = curl(sb, "https://blocked.wild.test/hello.txt", "--resolve",
             f"blocked.wild.test:443:{UP_ADDR}")
    assert r.returncode != 0 and "hello" not in r.stdout
    # A name grant is HTTPS only: plain HTTP to it is refused by the proxy.
    r = sh(sb, "curl -sS -m 8 http://api.test/hello.txt")
    assert "hello from upstream" not in r.stdout
    # Other ports of the granted address are closed (name rules open 443 only).
    assert sh(sb, f"curl -sS -m 3 http://{UP_ADDR}:7/").returncode != 0


def test_a_cidr_rule_with_ports(started):
    import cwsandbox as c

    sb = started(network=c.NetworkOptions(egress=[
        c.EgressRule(cidr=f"{UP_ADDR}/32", ports=[7])]))
    echo = (f"import socket; s=socket.create_connection(('{UP_ADDR}', 7), timeout=5); "
            "s.sendall(b'ping'); print(s.recv(4).decode())")
    r = sb.exec(["python", "-c", echo], check=False).result(timeout=RPC)
    assert r.stdout.strip() == "ping", r.stderr
    assert sh(sb, f"curl -sS -m 3 http://{UP_ADDR}/hello.txt").returncode != 0


@pytest.fixture
def host_listener():
    """A TCP server on every host address, answering `host`."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.sendall(b"host\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_any_reaches_the_internet_but_not_metadata_the_host_or_siblings(started, host_listener):
    import cwsandbox as c

    anyone = c.NetworkOptions(egress=[c.EgressRule(any=True)])
    a = started(network=anyone)
    b = started("python", "-m", "http.server", "8000", network=anyone)
    assert sh(a, f"curl -sS -m 8 http://{UP_ADDR}/hello.txt").stdout == "hello from upstream\n"
    b_addr = address_of(b)
    for target in ["169.254.169.254:80", f"{HOST_ADDR}:{host_listener}",
                   f"{GATEWAY}:{host_listener}", f"{b_addr}:8000"]:
        r = sh(a, f"curl -sS -m 3 http://{target}/")
        assert r.returncode != 0, target
    # The host itself reaches a sandbox's ports (private services), ingress or not.
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((b_addr, 8000), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert s.recv(12).startswith(b"HTTP/1.0 200")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_siblings_meet_only_where_ingress_allows(started, netd, principal_b):
    import cwsandbox as c

    server = c.NetworkOptions(ingress=[c.IngressRule(tenant="same_user", ports=[8000])])
    b = started("python", "-m", "http.server", "8000", network=server)
    closed = started("python", "-m", "http.server", "8000",
                     network=c.NetworkOptions(deny_ingress=True))
    to_mine = c.NetworkOptions(egress=[c.EgressRule(tenant="same_user")])
    a = started(network=to_mine)
    b_addr, closed_addr = address_of(b), address_of(closed)
    ok = f"curl -sS -m 5 -o /dev/null -w '%{{http_code}}' --retry 10 --retry-connrefused --retry-delay 1 http://{b_addr}:8000/"
    assert sh(a, ok).stdout == "200"
    assert sh(a, f"curl -sS -m 3 http://{closed_addr}:8000/").returncode != 0
    # Another principal's sandbox is not "the same user".
    other = c.Sandbox.run(network=to_mine, auth=principal_b.bearer)
    try:
        assert sh(other, f"curl -sS -m 3 http://{b_addr}:8000/").returncode != 0
    finally:
        other.stop(missing_ok=True).result(timeout=RPC)


def test_a_killed_daemon_cuts_no_connection_and_its_policy_holds(started, netd):
    import cwsandbox as c

    sb = started(network=c.NetworkOptions(egress=[c.EgressRule(cidr=f"{UP_ADDR}/32", ports=[7])]))
    # A connection kept open across the restart: it echoes a line every 0.2 s.
    keeper = (
        f"import socket,time; s=socket.create_connection(('{UP_ADDR}', 7), timeout=5)\n"
        "f=open('/tmp/echo.log','a')\n"
        "while True:\n"
        "    s.sendall(b'x'); f.write(s.recv(1).decode()); f.flush(); time.sleep(0.2)\n"
    )
    sb.write_file("/tmp/keeper.py", keeper.encode()).result(timeout=RPC)
    sh(sb, "nohup python /tmp/keeper.py >/tmp/keeper.out 2>&1 &")
    deadline = time.monotonic() + 20
    while len(sh(sb, "cat /tmp/echo.log").stdout) < 3:
        assert time.monotonic() < deadline, sh(sb, "cat /tmp/keeper.out").stdout
        time.sleep(0.2)
    netd.restart(kill=True)
    before = len(sh(sb, "cat /tmp/echo.log").stdout)
    time.sleep(1.5)
    after = sh(sb, "cat /tmp/echo.log; cat /tmp/keeper.out")
    assert len(after.stdout.splitlines()[0]) > before + 3, after.stdout
    # The policy still holds: port 80 stays shut, port 7 open to new connections.
    assert sh(sb, f"curl -sS -m 3 http://{UP_ADDR}/hello.txt").returncode != 0
    echo = (f"import socket; s=socket.create_connection(('{UP_ADDR}', 7), timeout=5); "
            "s.sendall(b'pong'); print(s.recv(4).decode())")
    assert sb.exec(["python", "-c", echo]).result(timeout=RPC).stdout.strip() == "pong"


def _create_error(netd: Server, key: str, network) -> grpc.RpcError:
    from cwsandbox._proto import sandbox_pb2, sandbox_pb2_grpc

    spec = sandbox_pb2.SandboxSpec(
        containers=[sandbox_pb2.Container(name="main", image="python:3.11")], network=network)
    with grpc.insecure_channel(f"127.0.0.1:{netd.port}") as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(spec=spec)),
                metadata=(("authorization", f"Bearer {key}"),),
            )
    return info.value


SERVER = """
import http.server, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        token = self.headers.get("X-Sandbox-Share-Token")
        body = f"port {self.server.server_port} token={token}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for port in (8000, 8001, 8002, 8003):
    s = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Event().wait()
"""

TLS_SERVER = """
import socket, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("/tmp/tls.pem", "/tmp/tls.key")
srv = socket.create_server(("0.0.0.0", 8443))
while True:
    conn, _ = srv.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as t:
            t.sendall(b"tls ok")
    except OSError:
        pass
"""


def http_get(host_port: tuple[str, int], host: str | None = None, headers=None, retries=50):
    """(status, body) of GET / at `host_port` with `Host: host`, retried while refused."""
    import http.client

    for attempt in range(retries):
        conn = http.client.HTTPConnection(*host_port, timeout=10)
        try:
            conn.request("GET", "/", headers={**({"Host": host} if host else {}), **(headers or {})})
            r = conn.getresponse()
            body = r.read().decode()
            # The frontend answers 502 until the sandbox's server listens.
            if r.status == 502 and attempt + 1 < retries:
                time.sleep(0.2)
                continue
            return r.status, body
        except (ConnectionRefusedError, ConnectionResetError):
            if attempt + 1 == retries:
                raise
            time.sleep(0.2)
        finally:
            conn.close()


def split_url(url: str) -> tuple[str, tuple[str, int]]:
    """`scheme://host:port` -> (host, (host, port))."""
    rest = url.split("://", 1)[1].rstrip("/")
    host, port = rest.rsplit(":", 1)
    return host, (host, int(port))


def test_public_and_private_services_and_share_tokens(started, netd):
    import cwsandbox as c

    https = lambda auth: c.Endpoint(kind="https", auth=auth)  # noqa: E731
    sb = started("python", "-c", SERVER, services=[
        c.Service(port=8000, name="shared", visibility="public", endpoint=https("share_token")),
        c.Service(port=8001, name="open", visibility="public", endpoint=https("open")),
        c.Service(port=8002, name="private", visibility="private"),
        c.Service(port=8003, name="raw", visibility="public"),
    ])
    urls = {name: url for _, name, url in sb.service_urls}
    assert set(urls) == {"shared", "open", "private", "raw"}, sb.service_urls
    frontend = ("127.0.0.1", netd.public_http_port)
    shared_host, _ = split_url(urls["shared"])
    assert shared_host == f"8000-{sb.sandbox_id}.sandpit.localhost"
    assert urls["shared"].endswith(f":{netd.public_http_port}")
    # A share-token endpoint refuses a request without the token, or with a wrong one.
    assert http_get(frontend, shared_host)[0] == 401
    assert http_get(frontend, shared_host, {"X-Sandbox-Share-Token": "0" * 64})[0] == 401
    token = sb.endpoint_share_token
    assert token is not None
    status, body = http_get(frontend, shared_host, token.as_headers())
    # The sandbox never sees the token.
    assert (status, body) == (200, "port 8000 token=None")
    open_host, _ = split_url(urls["open"])
    assert http_get(frontend, open_host) == (200, "port 8001 token=None")
    # No route for a port that was not published, nor for an unknown sandbox.
    assert http_get(frontend, f"8002-{sb.sandbox_id}.sandpit.localhost")[0] == 404
    assert http_get(frontend, "8000-nosuchsandbox.sandpit.localhost")[0] == 404
    # PRIVATE: the sandbox's own address, from the host.
    _, private = split_url(urls["private"])
    assert private[0].startswith("10.210.")
    assert http_get(private) == (200, "port 8002 token=None")
    # A raw TCP service on a host port of the configured range.
    _, raw = split_url(urls["raw"])
    assert raw[0] == "127.0.0.1" and 31000 <= raw[1] <= 31099, raw
    assert http_get(raw) == (200, "port 8003 token=None")
    # Get and list do not show the token.
    again = c.Sandbox.from_id(sb.sandbox_id).result(timeout=RPC)
    assert again.endpoint_share_token is None
    sb.stop().result(timeout=RPC)
    # Once stopped, nothing of it is published.
    assert http_get(frontend, open_host)[0] == 404
    with pytest.raises(OSError):
        socket.create_connection(raw, timeout=3).close()


def test_tls_passthrough_is_routed_by_sni_and_not_terminated(started, netd, upstream, e2e_dirs):
    import ssl

    import cwsandbox as c

    work = e2e_dirs.root / "tls"
    work.mkdir(exist_ok=True)
    key, csr, cert, ext = (work / n for n in ("tls.key", "tls.csr", "tls.pem", "ext.cnf"))
    ca_key = upstream.ca_pem.with_name("ca.key")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(csr), "-subj", "/CN=sandpit.localhost"], check=True,
                   capture_output=True)
    ext.write_text("subjectAltName=DNS:*.sandpit.localhost\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(upstream.ca_pem),
                    "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-days", "1",
                    "-extfile", str(ext)], check=True, capture_output=True)
    sb = started(services=[c.Service(port=8443, name="tls", visibility="public",
                                     endpoint=c.Endpoint(kind="tls_passthrough"))])
    sb.write_file("/tmp/tls.pem", cert.read_bytes()).result(timeout=RPC)
    sb.write_file("/tmp/tls.key", key.read_bytes()).result(timeout=RPC)
    sb.write_file("/tmp/tls.py", TLS_SERVER.encode()).result(timeout=RPC)
    sh(sb, "nohup python /tmp/tls.py >/tmp/tls.out 2>&1 &")
    (entry,) = sb.service_addresses
    host, port = entry.address.rsplit(":", 1)
    assert host == f"8443-{sb.sandbox_id}.sandpit.localhost"
    ctx = ssl.create_default_context(cafile=str(upstream.ca_pem))
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as raw:
                # The certificate checked is the sandbox's own: TLS ends there.
                with ctx.wrap_socket(raw, server_hostname=host) as t:
                    assert t.recv(64).startswith(b"tls ok")
            break
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    # Another name gets nothing.
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw, server_hostname="8443-nosuch.sandpit.localhost") as t:
                t.recv(1)


def test_bad_rules_are_invalid_argument_naming_the_field(netd, principal_a):
    from cwsandbox._proto import sandbox_pb2 as pb

    P = "sandbox.spec.network"
    cases = [
        (pb.NetworkOptions(egress=[pb.EgressRule(cidr=pb.CidrBlock(cidr="10.0.0.0/33"))]),
         f"{P}.egress[0].cidr.cidr"),
        (pb.NetworkOptions(egress=[pb.EgressRule(https_hostname="api.*.test")]),
         f"{P}.egress[0].https_hostname"),
        (pb.NetworkOptions(deny_egress=True, egress=[pb.EgressRule(any=True)]),
         f"{P}.deny_egress"),
        (pb.NetworkOptions(egress=[pb.EgressRule(any=True, ports=[pb.PortRange(port=0)])]),
         f"{P}.egress[0].ports[0]"),
        (pb.NetworkOptions(ingress=[pb.IngressRule(any=True, ports=[pb.PortRange(port=70000)])]),
         f"{P}.ingress[0].ports[0]"),
    ]
    # Networks of earlier tests' sandboxes may still be being released (in
    # the background, moments after their delete): only new objects count.
    before = set(per_sandbox_objects())
    for network, field in cases:
        e = _create_error(netd, principal_a.key, network)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.details())
        trailers = b"".join(v for k, v in e.trailing_metadata() if k.endswith("-bin"))
        assert field.encode() in trailers, (field, e.details())
    # Nothing of the refused sandboxes was made.
    assert set(per_sandbox_objects()) - before == set()


def test_create_delete_cycles_leave_nothing_behind(net_env, netd):
    import cwsandbox as c

    def cycle(n: int) -> None:
        for _ in range(n):
            sb = c.Sandbox.run("true", network=c.NetworkOptions(egress=[c.EgressRule(any=True)]))
            sb.stop(missing_ok=True).result(timeout=RPC)

    before_links = len(sandbox_links())
    threads = [threading.Thread(target=cycle, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 30
    while per_sandbox_objects() and time.monotonic() < deadline:
        time.sleep(0.2)
    chains, sets = nft_objects()
    # What is left is the pool (prepared namespaces have links but no rules yet).
    assert len(sandbox_links()) <= before_links, sandbox_links()
    assert per_sandbox_objects() == [], (chains, sets)
    assert list((netd.data_dir / "network").glob("*.json")) == []
