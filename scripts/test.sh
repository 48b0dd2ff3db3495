#!/usr/bin/env bash
# The whole test suite: lints, unit tests, privileged engine tests (root),
# the protocol drift test against the real client, and the benchmark's quick
# mode. Run as root: sandboxes need namespaces and cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh needs root (namespaces, cgroups, overlayfs): sudo $0" >&2
  exit 1
fi
export CARGO_TERM_COLOR=never

scripts/install-deps.sh
scripts/build-test-images.sh
scripts/build-agent.sh

echo "== fmt and clippy" >&2
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== cargo test (unit and privileged)" >&2
cargo test --workspace --all-features

if [ -d tests/compat ]; then
  echo "== protocol drift test (real cwsandbox client)" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q -r tests/requirements.txt
  .venv/bin/python -m pytest -q tests/compat
fi

echo "== benchmark, quick mode (no speed assertions)" >&2
cargo build -q --release -p sandpit-bench -p sandpit-runtime --bins
target/release/sandpit-bench --quick --data-dir target/bench-quick --json target/bench-quick.json
