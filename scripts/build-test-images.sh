#!/usr/bin/env bash
# Builds the root filesystems the tests and the quick start use, without any
# registry: a Debian bookworm rootfs with Python 3.11 (mmdebstrap) and a tiny
# busybox rootfs. Output goes to .cache/images/ and is reused when present.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/images
mkdir -p "$out"

if [ ! -s "$out/python311.tar" ]; then
  echo "building $out/python311.tar (mmdebstrap, ~20 s)" >&2
  tmp=$(mktemp "$out/python311.XXXXXX.tar")
  # essential + python3 is what `python:3.11` users expect: a shell, coreutils, python3.
  mmdebstrap --quiet --variant=essential --include=python3,python-is-python3,procps \
    --customize-hook='chroot "$1" sh -c "mkdir -p /workspace"' \
    bookworm "$tmp"
  mv "$tmp" "$out/python311.tar"
fi

if [ ! -s "$out/busybox.tar" ]; then
  echo "building $out/busybox.tar" >&2
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev}
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  tar -C "$root" --numeric-owner -cf "$out/busybox.tar" .
fi
ls -la "$out"
