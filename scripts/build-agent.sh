#!/usr/bin/env bash
# Builds sandpit-agent fully static (glibc, crt-static) so it runs as PID 1 in
# any image, then checks that it really is static and prints its path.
# The agent never resolves hosts and reads the image's /etc/passwd and
# /etc/group itself (run_as_user by name), so glibc's NSS (which a static
# glibc cannot load) is never needed.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
out=target/agent/$target/release/sandpit-agent

# RUSTFLAGS applies to the target only because --target is given: build
# scripts and proc macros of the host stay dynamic.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release -p sandpit-agent --target "$target" --target-dir target/agent

if [ ! -x "$out" ]; then
  echo "build-agent: $out missing after the build" >&2
  exit 1
fi
# A dynamic executable has a PT_INTERP (program interpreter) header.
if command -v readelf >/dev/null 2>&1; then
  if readelf -lW "$out" | grep -q 'INTERP'; then
    echo "build-agent: $out is not static (it has a program interpreter)" >&2
    exit 1
  fi
  if readelf -dW "$out" 2>/dev/null | grep -q '(NEEDED)'; then
    echo "build-agent: $out needs shared libraries" >&2
    exit 1
  fi
elif command -v file >/dev/null 2>&1; then
  if ! file -L "$out" | grep -Eq 'statically linked|static-pie linked'; then
    echo "build-agent: $out is not static: $(file -L "$out")" >&2
    exit 1
  fi
else
  echo "build-agent: neither readelf nor file found, static check skipped" >&2
fi
chmod +x "$out"
echo "$out"
