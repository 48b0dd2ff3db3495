"""The direct data plane (ConnectSandbox): exec, files and logs go from the client straight
to the runner over mTLS with a sandbox-scoped certificate from a gateway, and bypass the
gateways; a runner without a direct endpoint is reached through the gateway (the client's
fallback); a credential reaches only its sandbox, and nothing reaches the endpoint without
one."""

from __future__ import annotations

import datetime

import grpc
import pytest

from .cluster import DIRECT_PORT, RPC, RUNNER_IDS, live_runner_ids, run, started, wait_for

PRINTER = "import time\nfor i in range(3):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n"


def test_data_calls_go_direct_and_outlive_both_gateways(cluster, principal_a, tag):
    gw = cluster.gateway
    sb = run(gw.url, principal_a, "python", "-c", PRINTER + "time.sleep(600)\n", tags=[tag],
             runner_ids=["r1"], data_plane="direct")
    sb.wait(timeout=RPC)
    assert sb.runner_id == "r1"
    # The first call of each kind asks a gateway for its credential (the client
    # asks ConnectSandbox for one permission at a time and keeps each).
    first = sb.exec(["echo", "direct"]).result(timeout=RPC)
    assert (first.stdout, first.returncode) == ("direct\n", 0)
    sb.write_file("/tmp/warm", b"w").result(timeout=RPC)
    assert sb.read_file("/tmp/warm").result(timeout=RPC) == b"w"
    assert next(iter(sb.stream_logs(follow=True))).strip() == "line 0"
    for g in cluster.gateways:
        g.kill9()
    try:
        # No gateway left: what still works went straight to r1.
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result(timeout=RPC)
        assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 3)
        sb.write_file("/tmp/direct.bin", bytes(range(256)) * 64).result(timeout=RPC)
        assert sb.read_file("/tmp/direct.bin").result(timeout=RPC) == bytes(range(256)) * 64
        lines = []
        for line in sb.stream_logs(follow=True):
            lines.append(line)
            if len(lines) == 3:
                break
        assert [line.strip() for line in lines] == ["line 0", "line 1", "line 2"]
    finally:
        for g in cluster.gateways:
            g.start()
        for g in cluster.gateways:
            wait_for(lambda g=g: set(RUNNER_IDS) <= live_runner_ids(g.url, principal_a),
                     timeout=30, what=f"the restarted {g.name} listing the runners")


def test_a_runner_without_a_direct_endpoint_is_reached_through_the_gateway(cluster, principal_a, tag):
    gw = cluster.gateway
    auto = started(gw.url, principal_a, tags=[tag], runner_ids=["r3"])
    r = auto.exec(["echo", "fallback"]).result(timeout=RPC)
    assert (r.stdout, r.returncode) == ("fallback\n", 0)
    # DIRECT mode surfaces that there is no direct path instead of falling back.
    strict = started(gw.url, principal_a, tags=[tag], runner_ids=["r3"], data_plane="direct")
    with pytest.raises(Exception) as e:
        strict.exec(["echo", "nope"]).result(timeout=RPC)
    assert "direct" in str(e.value).lower(), e.value


def _credential(gw_url: str, key: str, sandbox_id: str, permission: int):
    """ConnectSandbox with a fresh key and CSR, as the client makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cwsandbox._proto import sandbox_pb2, sandbox_pb2_grpc

    private = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(private, hashes.SHA256())
    with grpc.insecure_channel(gw_url.removeprefix("http://")) as ch:
        conn = sandbox_pb2_grpc.SandboxServiceStub(ch).ConnectSandbox(
            sandbox_pb2.ConnectSandboxRequest(
                sandbox_id=sandbox_id,
                csr_der=csr.public_bytes(serialization.Encoding.DER),
                requested_permissions=[permission],
            ),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=30,
        )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return conn, key_pem


def _direct_exec(conn, key_pem: bytes | None, sandbox_id: str) -> grpc.RpcError | None:
    from cwsandbox._proto import sandbox_data_plane_pb2_grpc, sandbox_pb2

    creds = grpc.ssl_channel_credentials(
        root_certificates=bytes(conn.server_ca_bundle_pem),
        private_key=key_pem,
        certificate_chain=bytes(conn.client_certificate_chain_pem) if key_pem else None,
    )
    target = conn.endpoint_uri.removeprefix("https://")
    with grpc.secure_channel(target, creds) as ch:
        stub = sandbox_data_plane_pb2_grpc.SandboxDataPlaneServiceStub(ch)
        try:
            stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sandbox_id, command=["true"]), timeout=15)
        except grpc.RpcError as e:
            return e
    return None


def test_a_credential_reaches_only_its_sandbox_and_its_operations(cluster, principal_a, principal_b, tag):
    from cwsandbox._proto import sandbox_pb2

    gw = cluster.gateway
    mine = started(gw.url, principal_a, tags=[tag], runner_ids=["r2"])
    other = started(gw.url, principal_a, tags=[tag], runner_ids=["r2"])
    exec_perm = sandbox_pb2.SANDBOX_DATA_PERMISSION_EXEC
    conn, key_pem = _credential(gw.url, principal_a.key, mine.sandbox_id, exec_perm)
    assert conn.endpoint_uri == f"https://{cluster.netns['r2'].ns_ip}:{DIRECT_PORT}"
    assert conn.endpoint_id == "r2"
    assert list(conn.granted_permissions) == [exec_perm]
    ttl = conn.expires_at.ToDatetime(tzinfo=datetime.timezone.utc) - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=5) < ttl <= datetime.timedelta(minutes=10), ttl

    assert _direct_exec(conn, key_pem, mine.sandbox_id) is None
    # Another sandbox of the same owner on the same runner: refused.
    e = _direct_exec(conn, key_pem, other.sandbox_id)
    assert e is not None and e.code() == grpc.StatusCode.PERMISSION_DENIED, e
    # No client certificate: the handshake itself fails.
    e = _direct_exec(conn, None, mine.sandbox_id)
    assert e is not None and e.code() == grpc.StatusCode.UNAVAILABLE, e
    # Another principal gets no credential for A's sandbox.
    with pytest.raises(grpc.RpcError) as err:
        _credential(gw.url, principal_b.key, mine.sandbox_id, exec_perm)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
