#!/usr/bin/env bash
# Quick start: brings sandpitd up with its embedded defaults.
#
# Installs the Debian packages the build needs, builds the static agent and
# the binaries, prepares the default python:3.11 image locally (no public
# registry is reachable here: the image is built with mmdebstrap and imported
# into the store under docker.io/library/python:3.11), then starts sandpitd
# in the background on 127.0.0.1:50051 with its data in /var/lib/sandpit, and
# checks it with a sandbox. Idempotent: a running daemon is left alone.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/up.sh needs root (namespaces, cgroups, overlayfs): sudo $0" >&2
  exit 1
fi
data_dir=${SANDPIT_DATA_DIR:-/var/lib/sandpit}
listen=${SANDPIT_LISTEN:-127.0.0.1:50051}

scripts/install-deps.sh
scripts/build-agent.sh
cargo build --release --bins
scripts/build-test-images.sh
# A ready client: cwsandbox and wandb (wandb.sandbox), the versions the
# tests pin, in .venv.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r tests/requirements.txt

sandpit() { target/release/sandpit --data-dir "$data_dir" "$@"; }
# (Re-)imported when missing or built from another recipe.
if ! sandpit image ls | grep -q '^docker.io/library/python:3.11 ' \
  || ! cmp -s .cache/images/python311.recipe "$data_dir/python311.recipe"; then
  sandpit image import python:3.11 .cache/images/python311.tar \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3
  cp .cache/images/python311.recipe "$data_dir/python311.recipe"
fi

pidfile=$data_dir/sandpitd.pid
log=$data_dir/sandpitd.log
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "sandpitd already runs (pid $(cat "$pidfile"))" >&2
else
  # setsid: the daemon outlives this shell; its sandboxes outlive the daemon.
  setsid target/release/sandpitd --listen "$listen" --data-dir "$data_dir" \
    >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 100); do
    grep -q "sandpitd listening on" "$log" 2>/dev/null && break
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 0.1
  done
fi

# A sandbox through the daemon, end to end: the engine, then the real client.
export SANDPIT_SERVER=http://$listen
sandpit ls --all >/dev/null
echo "+ sandpit run python:3.11 -- python3 --version (engine, no daemon)" >&2
sandpit run --tty never python:3.11 -- python3 --version
snippet='from cwsandbox import Sandbox
with Sandbox.run() as sb:
    print(sb.exec(["pip", "--version"]).result().stdout, end="")'
echo "+ the cwsandbox client through sandpitd" >&2
CWSANDBOX_BASE_URL=http://$listen CWSANDBOX_API_KEY=$(cat "$data_dir/api-key") \
  .venv/bin/python -c "$snippet"
cat <<MSG

sandpitd is up on $listen (pid $(cat "$pidfile"), log $log).
Its API key is in $data_dir/api-key. The clients (cwsandbox, and wandb.sandbox
which the product docs use) are installed in .venv; point them at it:

  . .venv/bin/activate
  export CWSANDBOX_BASE_URL=http://$listen
  export CWSANDBOX_API_KEY=\$(cat $data_dir/api-key)
  export WANDB_API_KEY=\$CWSANDBOX_API_KEY      # wandb.sandbox reads this one
  python -c '$snippet'

List sandboxes with target/release/sandpit ls --all; stop the daemon with
kill \$(cat $pidfile) (its sandboxes keep running and are adopted on restart).
MSG
