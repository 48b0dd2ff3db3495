#!/usr/bin/env bash
# Installs the S3-compatible server the sandpit-snapshot S3 tests run on
# loopback: s3s-fs (a small Rust S3 server over a directory), from
# crates.io, idempotent. The tests find it at $SANDPIT_S3_SERVER or at
# /opt/s3s-fs/bin/s3s-fs (this script's default root) and skip, saying so,
# when it is absent.
#   SANDPIT_S3_ROOT  install root (default /opt/s3s-fs)
set -euo pipefail
version=0.14.1
root=${SANDPIT_S3_ROOT:-/opt/s3s-fs}
bin=$root/bin/s3s-fs
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qF "$version"; then
  echo "s3s-fs $version already at $bin" >&2
  exit 0
fi
echo "installing s3s-fs $version into $root (a few minutes)" >&2
CARGO_INCREMENTAL=0 cargo install s3s-fs --version "$version" --locked \
  --features binary --root "$root"
"$bin" --version >&2
