"""Fixtures of the multi-runner tests: one `Cluster` per session (cluster.py).

The session's principals A and B are the e2e harness's (tests/e2e/conftest.py);
every runner and gateway accepts both keys. `tag` is redefined here: the
harness's own would start its single-host daemon. Failing tests get the tails
of every runner's, gateway's and PostgreSQL's log in their report.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Iterator

import pytest

import conftest as e2e

from .cluster import Cluster

_CLUSTER: Cluster | None = None


@pytest.fixture(scope="session", autouse=True)
def _no_endpoint_in_env() -> Iterator[None]:
    """Every call names its endpoint; CWSANDBOX_BASE_URL would override `SandboxDefaults`."""
    saved = os.environ.pop("CWSANDBOX_BASE_URL", None)
    yield
    if saved is not None:
        os.environ["CWSANDBOX_BASE_URL"] = saved


@pytest.fixture(scope="session")
def cluster(
    binaries: e2e.Binaries, principal_a: e2e.Principal, principal_b: e2e.Principal
) -> Iterator[Cluster]:
    global _CLUSTER
    principals = [principal_a, principal_b]
    c = Cluster(binaries, [p.key for p in principals])
    _CLUSTER = c
    try:
        c.start(principal_a)
    except BaseException as e:
        logs = "\n".join(f"--- {name} ---\n{text}" for name, text in c.logs(30))
        problems = c.close(principals)
        _CLUSTER = None
        extra = ("\ncleanup problems:\n" + "\n".join(problems)) if problems else ""
        kept = f"\n(kept {c.root})" if c.keep else ""
        pytest.fail(f"cluster start-up failed: {type(e).__name__}: {e}{extra}{kept}\n{logs}", pytrace=False)
    print(f"\ncluster up in {c.timings} at {c.root}", file=sys.stderr)
    yield c
    logs = "\n".join(f"--- {name} ---\n{text}" for name, text in c.logs(30))
    problems = c.close(principals)
    _CLUSTER = None
    print(f"\ncluster closed: {c.timings}", file=sys.stderr)
    if c.keep:
        print(f"\nsandpit cluster e2e: kept {c.root}", file=sys.stderr)
    if problems:
        raise AssertionError("cluster teardown found:\n" + "\n\n".join(problems) + "\n" + logs)


@pytest.fixture(autouse=True)
def _whole(request: pytest.FixtureRequest) -> None:
    """Each test starts on the whole topology: a fault test that failed half-way (a runner
    or gateway left down) is not the next test's failure."""
    if "cluster" not in request.fixturenames:
        return
    c: Cluster = request.getfixturevalue("cluster")
    principal = request.getfixturevalue("principal_a")
    if c.pg is not None and (c.pg.proc is None or c.pg.proc.poll() is not None):
        c.pg.start()
    restarted = [d for d in [*c.runners.values(), *c.gateways] if not d.alive()]
    for d in restarted:
        d.start()
    if restarted:
        from .cluster import RUNNER_IDS, live_runner_ids, wait_for

        for gw in c.gateways:
            wait_for(lambda: set(RUNNER_IDS) <= live_runner_ids(gw.url, principal), timeout=30,
                     what=f"{gw.name} listing every runner after restarting {[d.name for d in restarted]}")


@pytest.fixture
def tag(request: pytest.FixtureRequest, cluster: Cluster, principal_a, principal_b) -> Iterator[str]:
    """A tag unique to this test; sandboxes of both principals still active with it are stopped after."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    value = f"e2e-{name}-{secrets.token_hex(3)}"
    yield value
    for gw in cluster.gateways:
        if gw.alive():
            e2e.sweep(gw, [principal_a, principal_b], tags=[value])
            return


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _CLUSTER is not None:
        for name, text in _CLUSTER.logs(40):
            report.sections.append((name, text))
