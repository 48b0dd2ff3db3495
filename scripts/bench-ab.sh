#!/usr/bin/env bash
# Interleaved A/B runs of the benchmark: two builds, alternating, ROUNDS
# times each, on the same machine in one session; prints every measure's
# p50 per run, the median of those p50s, and the ratio B/A.
#
#   scripts/bench-ab.sh A_BIN_DIR B_BIN_DIR [ROUNDS] [-- sandpit-bench args...]
#
# Each BIN_DIR holds sandpit-bench, sandpitd and sandpit-spawn, with the
# static agent at BIN_DIR/../agent/x86_64-unknown-linux-gnu/release/ (the
# layout of target/release). Default bench args: `--daemon --only
# engine,cold,exec,cycles --iterations 100`. Run as root, machine quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
a=$(realpath "$1"); b=$(realpath "$2"); shift 2
rounds=3
if [ $# -gt 0 ] && [ "$1" != "--" ]; then rounds=$1; shift; fi
[ "${1:-}" = "--" ] && shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--daemon --only engine,cold,exec,cycles --iterations 100)
out=$(mktemp -d /var/tmp/sandpit-ab.XXXXXX)
trap 'rm -rf "$out"' EXIT

for r in $(seq "$rounds"); do
  for side in a b; do
    dir=$a; [ "$side" = b ] && dir=$b
    echo "== round $r: $side ($dir)" >&2
    "$dir/sandpit-bench" --agent "$dir/../agent/x86_64-unknown-linux-gnu/release/sandpit-agent" \
      --data-dir "$out/data-$side" --json "$out/$side-$r.json" "${args[@]}" >/dev/null
  done
done

python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(side):
    runs = []
    for r in range(1, rounds + 1):
        with open(f"{out}/{side}-{r}.json") as f:
            runs.append({m["measure"]: m.get("p50_ms", m.get("value")) for m in json.load(f)})
    return runs
a, b = load("a"), load("b")
print(f"| measure | A p50 per run | B p50 per run | A median | B median | B/A |")
print(f"| --- | --- | --- | ---: | ---: | ---: |")
for name in a[0]:
    va = [r[name] for r in a if name in r]
    vb = [r[name] for r in b if name in r]
    if not vb:
        continue
    ma, mb = statistics.median(va), statistics.median(vb)
    ratio = f"{mb / ma:.2f}" if ma else "-"
    fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)
    print(f"| {name} | {fmt(va)} | {fmt(vb)} | {ma:.2f} | {mb:.2f} | {ratio} |")
PY
