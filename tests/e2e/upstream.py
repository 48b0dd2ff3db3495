"""An "upstream" network namespace that plays the internet for the networking tests.

Traffic of the tests goes only to loopback and to namespaces the tests create:
this module creates one, `sp-e2e-up`, joined to the host by a veth pair on
198.51.100.0/24 (TEST-NET-2, documentation space: never a real destination), and
runs in it:

- a DNS server (UDP and TCP, port 53) authoritative for the test names
  (`files.test`, `api.test`, `pypi.test`, `*.wild.test`, `private.test` which
  resolves to a private address, for the rebinding checks), NXDOMAIN for the rest;
- an HTTP server on 80 and an HTTPS server on 443 with a private CA generated at
  start (the CA's PEM is what the daemon is configured to inject into sandboxes);
- a PEP 503 package index (`https://pypi.test/simple/`) serving real wheels fetched
  with `pip download` on the host (the Python package registry is reachable from
  the host, never from a sandbox);
- a TCP echo server on 7 and a UDP echo server on 7, for CIDR and port rules.

Everything runs from the standard library, in one Python process inside the
namespace (`ip netns exec`), and is torn down (process, namespace, veth, route)
by `Upstream.close()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NETNS = "sp-e2e-up"
# Not `sp-...`: that prefix is the daemon's sandboxes' links (its firewall matches it).
HOST_IF = "e2e-up-h"
UP_IF = "e2e-up-u"
HOST_ADDR = "198.51.100.1"
UP_ADDR = "198.51.100.2"
PREFIX = 24
# What the test names resolve to: everything but private.test lives upstream.
PRIVATE_ADDR = "10.1.2.3"

SERVER = Path(__file__).with_name("upstream_server.py")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def make_ca(dirpath: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for `names`; returns (ca, cert, key)."""
    ca_key, ca = dirpath / "ca.key", dirpath / "ca.pem"
    key, csr, cert = dirpath / "server.key", dirpath / "server.csr", dirpath / "server.pem"
    ext = dirpath / "ext.cnf"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca), "-days", "2", "-subj", "/CN=sandpit e2e test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={names[0]}")
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def build_index(root: Path, packages: list[str]) -> list[str]:
    """`pip download`s `packages` (pure-Python wheels, no dependencies) into a PEP 503
    tree under `root/simple/`; returns the project names served."""
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if packages:
        run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "-d", str(wheels), *packages)
    projects: dict[str, list[str]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        project = whl.name.split("-")[0].lower().replace("_", "-")
        projects.setdefault(project, []).append(whl.name)
    simple = root / "simple"
    simple.mkdir(exist_ok=True)
    links = []
    for project, files in projects.items():
        d = simple / project
        d.mkdir(exist_ok=True)
        (d / "index.html").write_text(
            "<!DOCTYPE html><html><body>"
            + "".join(f'<a href="/wheels/{f}">{f}</a>' for f in files)
            + "</body></html>"
        )
        links.append(f'<a href="/simple/{project}/">{project}</a>')
    (simple / "index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>")
    return list(projects)


@dataclass
class Upstream:
    """The running upstream namespace."""

    workdir: Path
    ca_pem: Path
    projects: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def dns(self) -> str:
        return f"{UP_ADDR}:53"

    @staticmethod
    def start(packages: list[str] | None = None) -> "Upstream":
        Upstream.cleanup_leftovers()
        workdir = Path(tempfile.mkdtemp(prefix="sp-e2e-up-"))
        try:
            names = ["files.test", "api.test", "pypi.test", "*.wild.test"]
            ca, cert, key = make_ca(workdir, names)
            projects = build_index(workdir / "www", packages or [])
            (workdir / "www" / "hello.txt").write_text("hello from upstream\n")
            run("ip", "netns", "add", NETNS)
            run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", UP_IF)
            run("ip", "link", "set", UP_IF, "netns", NETNS)
            run("ip", "addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", HOST_IF)
            run("ip", "link", "set", HOST_IF, "up")
            ns = ("ip", "netns", "exec", NETNS)
            run(*ns, "ip", "addr", "add", f"{UP_ADDR}/{PREFIX}", "dev", UP_IF)
            run(*ns, "ip", "link", "set", UP_IF, "up")
            run(*ns, "ip", "link", "set", "lo", "up")
            # Replies to NAT'd sandboxes go back to the host.
            run(*ns, "ip", "route", "add", "default", "via", HOST_ADDR)
            up = Upstream(workdir=workdir, ca_pem=ca, projects=projects)
            up.proc = subprocess.Popen(
                [*ns, sys.executable, str(SERVER), "--addr", UP_ADDR, "--www",
                 str(workdir / "www"), "--cert", str(cert), "--key", str(key),
                 "--private", PRIVATE_ADDR],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            line = up.proc.stdout.readline() if up.proc.stdout else ""
            if "ready" not in line:
                raise RuntimeError(f"upstream servers did not start: {line!r}")
            return up
        except BaseException:
            Upstream.cleanup_leftovers()
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    @staticmethod
    def cleanup_leftovers() -> None:
        """Removes what an earlier, interrupted run may have left."""
        if run("ip", "netns", "pids", NETNS, check=False).returncode == 0:
            for pid in run("ip", "netns", "pids", NETNS, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        run("ip", "netns", "del", NETNS, check=False)
        run("ip", "link", "del", HOST_IF, check=False)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
        # The namespace's death takes its veth end, and with it the host's.
        deadline = time.monotonic() + 10
        while run("ip", "netns", "del", NETNS, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        run("ip", "link", "del", HOST_IF, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
