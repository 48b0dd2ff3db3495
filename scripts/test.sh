#!/usr/bin/env bash
# The whole test suite: lints, unit tests, privileged engine and daemon tests
# (root), the protocol drift test against the real client, end-to-end tests
# of sandpitd through the real cwsandbox and wandb.sandbox clients, and the
# benchmark's quick mode. Run as root: sandboxes need namespaces and cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh needs root (namespaces, cgroups, overlayfs): sudo $0" >&2
  exit 1
fi
export CARGO_TERM_COLOR=never
# The store's tests (crates/sandpit-cluster) fail, not skip, without PostgreSQL.
export SANDPIT_REQUIRE_POSTGRES=1

scripts/install-deps.sh
scripts/build-test-images.sh
scripts/build-agent.sh
scripts/install-s3-server.sh

echo "== fmt and clippy" >&2
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== cargo test (unit and privileged)" >&2
cargo test --workspace --all-features

echo "== python test environment (real cwsandbox and wandb clients)" >&2
python3 -m venv .venv
.venv/bin/pip install -q -r tests/requirements.txt

echo "== protocol drift test (our protos vs the client's descriptors)" >&2
.venv/bin/python -m pytest -q tests/compat

echo "== release build" >&2
cargo build -q --release --bins

echo "== Kubernetes manifests: offline against the schemas, configs through sandpitd --check-config (~2 s)" >&2
.venv/bin/python -m pytest -q tests/deploy

echo "== end-to-end tests (real sandpitd, real cwsandbox / wandb.sandbox clients)" >&2
.venv/bin/python -m pytest -q tests/e2e

echo "== Debian package installed and started in a booted systemd machine (~1 min)" >&2
.venv/bin/python -m pytest -q tests/package

echo "== benchmark, quick mode (no speed assertions)" >&2
target/release/sandpit-bench --quick --daemon --data-dir target/bench-quick --json target/bench-quick.json

echo "== network benchmark, quick mode (~11 s; iperf3/podman rows skipped when missing)" >&2
target/release/sandpit-bench --quick --net --only net --json target/bench-net-quick.json

echo "== placement benchmark, quick mode (1, 10, 100 runners in a real PostgreSQL; ~30 s)" >&2
cargo bench -q -p sandpit-cluster --bench placement -- --quick

echo "== gateway benchmark, quick mode (3 runners, 2 gateways, the real client; ~40 s)" >&2
.venv/bin/python scripts/bench-cluster.py --quick --json target/bench-cluster-quick.json
