#!/usr/bin/env bash
# Builds the root filesystems the tests and the quick start use, without any
# registry: a Debian bookworm rootfs with Python 3.11 (mmdebstrap) and a tiny
# busybox rootfs. Output goes to .cache/images/ and is reused when present.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/images
mkdir -p "$out"

# What `python:3.11` users expect: a shell and coreutils, python3 with pip
# and venv, CA certificates, curl and git, ps, ip and ping. Changing this
# list rebuilds the image (the recipe is kept next to it).
python_packages="python3,python-is-python3,python3-pip,python3-venv,ca-certificates,curl,git,procps,iproute2,iputils-ping"
recipe="bookworm essential $python_packages"
if [ ! -s "$out/python311.tar" ] || [ "$(cat "$out/python311.recipe" 2>/dev/null)" != "$recipe" ]; then
  echo "building $out/python311.tar (mmdebstrap, ~1 min)" >&2
  tmp=$(mktemp "$out/python311.XXXXXX.tar")
  # pip as in the official image: installs into the system site-packages
  # without complaining about Debian's "externally managed" marker.
  mmdebstrap --quiet --variant=essential --include="$python_packages" \
    --customize-hook='chroot "$1" sh -c "mkdir -p /workspace && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"' \
    bookworm "$tmp"
  mv "$tmp" "$out/python311.tar"
  echo "$recipe" >"$out/python311.recipe"
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
