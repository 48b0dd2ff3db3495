"""The ConfigMap's configurations are accepted by the real sandpitd.

Each role's TOML is taken from deploy/kubernetes/config.yaml, rendered as the runner's
initContainer renders it, its Secret paths pointed at temporary files, and checked with
`sandpitd --check-config` (which validates and exits, starting nothing). A key sandpitd
does not know, a bad value, or a missing required one fails here, not on a cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SANDPITD = ROOT / "target" / "release" / "sandpitd"
SECRET_PATH = "/etc/sandpit/secret/database-url"


def _config_map() -> dict[str, str]:
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes/config.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            return doc["data"]
    raise AssertionError("no ConfigMap in deploy/kubernetes/config.yaml")


def _check(toml: str, tmp_path: Path) -> subprocess.CompletedProcess:
    if not SANDPITD.exists():
        pytest.skip(f"{SANDPITD} not built (cargo build --release --bins)")
    url = tmp_path / "database-url"
    url.write_text("postgresql://sandpit:pw@postgres.sandpit.svc:5432/sandpit\n")
    assert SECRET_PATH in toml, "the config reads the database URL from the Secret's file"
    toml = toml.replace(SECRET_PATH, str(url))
    toml = toml.replace('data_dir = "/var/lib/sandpit"', f'data_dir = "{tmp_path / "data"}"')
    path = tmp_path / "sandpitd.toml"
    path.write_text(toml)
    env = {k: v for k, v in os.environ.items() if k != "SANDPIT_API_KEYS"}
    env["SANDPIT_API_KEYS"] = "k-one,k-two"
    return subprocess.run(
        [str(SANDPITD), "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_the_runner_config_as_rendered_is_valid(tmp_path: Path) -> None:
    toml = _config_map()["runner.toml"]
    rendered = toml.replace("@RUNNER_ID@", "node-a-example-com").replace("@POD_HOST@", "10.1.2.3")
    r = _check(rendered, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cluster runner" in r.stdout and '"node-a-example-com"' in r.stdout, r.stdout
    assert not (tmp_path / "data").exists(), "--check-config wrote the data dir"


def test_the_gateway_config_is_valid(tmp_path: Path) -> None:
    r = _check(_config_map()["gateway.toml"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cluster gateway" in r.stdout, r.stdout


def test_a_key_sandpitd_does_not_know_is_refused(tmp_path: Path) -> None:
    """The check can fail: an unknown key in [cluster] is exit status 2, naming it."""
    toml = _config_map()["gateway.toml"].replace("[cluster]", "[cluster]\nleader = true")
    r = _check(toml, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "leader" in r.stderr, r.stderr


def _make_ca(tmp_path: Path) -> tuple[Path, Path]:
    """The cluster CA as docs/deploy-kubernetes.md ("Direct data plane") makes it."""
    key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "3650", "-subj", "/CN=sandpit-cluster-ca", "-keyout", str(key),
         "-out", str(cert), "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_the_direct_data_plane_as_documented_is_valid(tmp_path: Path) -> None:
    """The optional direct data plane's keys, as the doc adds them, pass in both roles;
    a CA key that does not parse fails the gateway's check."""
    cert, key = _make_ca(tmp_path)
    gateway = _config_map()["gateway.toml"].replace(
        "[cluster]\n", f'[cluster]\nca_cert_file = "{cert}"\nca_key_file = "{key}"\n'
    )
    r = _check(gateway, tmp_path)
    assert r.returncode == 0, r.stderr
    runner = _config_map()["runner.toml"].replace(
        "[cluster]\n",
        '[cluster]\ndirect_listen = "0.0.0.0:50052"\n'
        'direct_advertise = "https://@POD_HOST@:50052"\n'
        f'client_ca_file = "{cert}"\n',
    )
    rendered = runner.replace("@RUNNER_ID@", "node-a").replace("@POD_HOST@", "10.1.2.3")
    r = _check(rendered, tmp_path)
    assert r.returncode == 0, r.stderr
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    r = _check(gateway, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "ca_key_file" in r.stderr, r.stderr
