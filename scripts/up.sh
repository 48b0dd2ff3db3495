#!/usr/bin/env bash
# Quick start: installs what the build needs, builds the static agent and the
# binaries, prepares the default python:3.11 image locally (no public registry
# is reachable here: it is built with mmdebstrap and imported into the store),
# then runs a command in a fresh sandbox. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/up.sh needs root (namespaces, cgroups, overlayfs): sudo $0" >&2
  exit 1
fi
data_dir=${SANDPIT_DATA_DIR:-/var/lib/sandpit}

scripts/install-deps.sh
scripts/build-agent.sh
cargo build --release --bins
scripts/build-test-images.sh

sandpit=target/release/sandpit
if ! "$sandpit" --data-dir "$data_dir" image ls | grep -q '^docker.io/library/python:3.11 '; then
  "$sandpit" --data-dir "$data_dir" image import python:3.11 .cache/images/python311.tar \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3
fi
"$sandpit" --data-dir "$data_dir" image ls
echo "+ sandpit run python:3.11 -- python3 --version" >&2
"$sandpit" --data-dir "$data_dir" run --tty never python:3.11 -- python3 --version
