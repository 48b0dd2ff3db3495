"""Every runnable snippet of the product docs, unmodified, through the gateways: the
client's endpoint is the balancer in front of gw1 and gw2 (as a Kubernetes Service is),
principal A's key, and the runners behind them (tests/e2e/test_seeds.py has the tables
of what is skipped and why, and runs the same snippets against a single host)."""

from __future__ import annotations

from pathlib import Path

import conftest as e2e
import pytest
import test_seeds as seeds

from .cluster import Cluster


class _Endpoint:
    def __init__(self, url: str):
        self.url = url


@seeds.needs_seeds
@pytest.mark.timeout(seeds.SNIPPET_TIMEOUT + 30)
@pytest.mark.parametrize("snippet", [seeds._param(s) for s in seeds.SNIPPETS])
def test_seed_snippet_through_the_gateways(
    snippet, cluster: Cluster, principal_a: e2e.Principal, tmp_path: Path
):
    assert cluster.balancer is not None
    endpoint = _Endpoint(f"http://127.0.0.1:{cluster.balancer.port}")
    env = e2e._client_env_values(endpoint, principal_a, tmp_path)
    # The balancer is the only endpoint the client is given (a snippet that only builds
    # objects, 001-L46, makes no call at all).
    seeds.check_snippet(snippet, env, tmp_path)
