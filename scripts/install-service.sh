#!/usr/bin/env bash
# Installs sandpitd as a systemd service on this host from the package
# scripts/build-deb.sh builds (the binaries built first when missing), with apt, which
# brings the dependencies. The service is enabled and started by the
# package; see docs/ops/service.md. Needs root and systemd as PID 1 (the
# quick start, scripts/up.sh, runs the daemon without either package or
# systemd).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/install-service.sh needs root: sudo $0" >&2
  exit 1
fi
if [ ! -d /run/systemd/system ]; then
  echo "install-service: systemd is not PID 1 here; run scripts/up.sh instead" >&2
  exit 1
fi
if [ ! -x target/release/sandpitd ] || [ ! -x target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent ]; then
  scripts/install-deps.sh
  scripts/build-agent.sh
  cargo build --release --bins
fi
# Packaged from the binaries as they are now.
deb=$(scripts/build-deb.sh | tail -1)
DEBIAN_FRONTEND=noninteractive apt-get install -y "./$deb"
systemctl is-active sandpitd
echo "sandpitd runs as a service; its API key is in /var/lib/sandpit/api-key" >&2
