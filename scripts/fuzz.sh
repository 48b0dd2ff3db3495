#!/usr/bin/env bash
# Runs the fuzz tests long: the wire decoder (crates/sandpit-wire/tests/fuzz_wire.rs)
# and request validation (crates/sandpit-server/src/api/validate_fuzz.rs), each
# property with SANDPIT_FUZZ_CASES cases (default here 100000; `cargo test`
# runs 256). Their seed corpora (fuzz/corpus/) are replayed first. Extra
# arguments go to cargo test, e.g. `scripts/fuzz.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "$0")/.."
export SANDPIT_FUZZ_CASES="${SANDPIT_FUZZ_CASES:-100000}"
exec cargo test --release -p sandpit-wire -p sandpit-server "$@" fuzz
