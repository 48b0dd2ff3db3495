#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need (idempotent).
set -euo pipefail
packages=(
  mmdebstrap      # builds the Debian/Python test rootfs
  busybox-static  # the tiny test rootfs
  podman runc     # the speed baseline in the benchmark
  iperf3          # sandpit-bench --net: TCP throughput baseline
  skopeo docker-registry  # registry tests
  protobuf-compiler       # gRPC protos
  python3-venv
  curl bc                 # scripts/bench-pull.sh
  nftables iproute2 openssl conntrack  # the networking tests inspect the firewall and conntrack, build the upstream namespace and its CA
  lxcfs                   # sandboxes' /proc/meminfo, cpuinfo, ... show their limits (docs/limits.md)
  chromium chromium-driver  # tests/e2e/test_console.py drives the web console in headless Chromium
  postgresql              # sandpit-cluster's tests start their own server on loopback (docs/scale-out.md)
  systemd-container logrotate dpkg-dev  # the package test: boots a machine (systemd-nspawn), checks the logrotate file; dpkg-shlibdeps for cargo-deb
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo-deb builds the Debian package (scripts/build-deb.sh); compiled once,
# about 2 minutes on 2 cores, then kept in ~/.cargo/bin.
cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qF "$cargo_deb_version"; then
  echo "installing cargo-deb $cargo_deb_version" >&2
  cargo install cargo-deb --locked --version "$cargo_deb_version" --quiet
fi
