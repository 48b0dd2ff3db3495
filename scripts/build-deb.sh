#!/usr/bin/env bash
# Builds the Debian package `sandpit` (sandpitd as a systemd service, the
# CLI, the spawner, the static agent, /etc/sandpit/sandpitd.toml, the
# logrotate file, the docs) from binaries already built:
#   scripts/build-agent.sh && cargo build --release --bins
# Output: target/debian/sandpit_<version>-1_amd64.deb (its path is printed).
# Needs cargo-deb (scripts/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
for f in target/release/sandpitd target/release/sandpit target/release/sandpit-spawn \
  target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent; do
  if [ ! -x "$f" ]; then
    echo "build-deb: $f missing: run scripts/build-agent.sh and cargo build --release --bins" >&2
    exit 1
  fi
done
mkdir -p target/debian
# --no-build: the binaries above are the ones tested (stripped in the
# package: the debug info of profile.release makes sandpitd ~180 MB;
# --fast: xz at a low level, seconds instead of minutes).
cargo deb -p sandpit-server --no-build --strip --fast --quiet --output target/debian/
