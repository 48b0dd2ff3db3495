#!/usr/bin/env bash
# Pull benchmark: time to pull (and unpack) the ~190 MB python:3.11 test
# image from a loopback registry with `sandpit image pull`, next to
# `skopeo copy` (download into an OCI layout, no unpack) and `podman pull`
# (download and unpack into containers-storage) of the same image from the
# same registry. Every run starts from an empty store (a new directory).
# Prints medians.
#
#   scripts/bench-pull.sh [RUNS]      (default 5; root; after cargo build --release --bins)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
scripts/install-deps.sh
rootfs=.cache/images/python311.tar
sandpit=target/release/sandpit
[ -s "$rootfs" ] || { echo "missing $rootfs: run scripts/build-test-images.sh" >&2; exit 1; }
[ -x "$sandpit" ] || { echo "missing $sandpit: run cargo build --release --bins" >&2; exit 1; }

work=$(mktemp -d /tmp/sandpit-bench-pull.XXXXXX)
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
image=127.0.0.1:$port/bench/python:3.11
skopeo copy --quiet --dest-tls-verify=false "tarball:$rootfs" "docker://$image"
blob_bytes=$(du -sb "$work/registry/docker/registry/v2/blobs" | cut -f1)
printf 'registry 127.0.0.1:%s holds %s (%.1f MiB of blobs, gzip; %.1f MiB unpacked)\n' \
  "$port" "$image" "$(echo "$blob_bytes/1048576" | bc -l)" "$(echo "$(stat -c %s "$rootfs")/1048576" | bc -l)"

cat >"$work/sandpitd.toml" <<EOF
[registry.registries."127.0.0.1:$port"]
insecure = true
EOF

# seconds.millis of one command
timed() {
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/last.err" || { cat "$work/last.err" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m}'; }

# Each run gets fresh directories, and nothing is deleted until the end: on
# ext4, creating thousands of files right after deleting thousands makes
# inode allocation scan the recently deleted ones (`recently_deleted`), which
# would measure the file system's history rather than the tools.
declare -A results
for i in $(seq "$runs"); do
  sync
  results[sandpit]+="$(timed "$sandpit" --data-dir "$work/sp-$i" image pull --quiet --config "$work/sandpitd.toml" "$image") "
  results[skopeo]+="$(timed skopeo copy --quiet --src-tls-verify=false "docker://$image" "oci:$work/oci-$i:bench") "
  results[podman]+="$(timed podman --root "$work/podman-$i/root" --runroot "$work/podman-$i/run" \
    pull --quiet --tls-verify=false "$image") "
done

sp=$(tr ' ' '\n' <<<"${results[sandpit]}" | grep . | median)
sk=$(tr ' ' '\n' <<<"${results[skopeo]}" | grep . | median)
pd=$(tr ' ' '\n' <<<"${results[podman]}" | grep . | median)
echo
echo "median of $runs pulls, empty destination each time (seconds):"
printf '| %-44s | %8s | %10s |\n' "tool" "p50 (s)" "vs sandpit"
printf '| %-44s | %8s | %10s |\n' "---" "---" "---"
printf '| %-44s | %8s | %10s |\n' "sandpit image pull (download+verify+unpack)" "$sp" "1.00x"
printf '| %-44s | %8s | %9.2fx |\n' "skopeo copy to oci: (download+verify)" "$sk" "$(echo "$sk/$sp" | bc -l)"
printf '| %-44s | %8s | %9.2fx |\n' "podman pull (download+verify+unpack)" "$pd" "$(echo "$pd/$sp" | bc -l)"
