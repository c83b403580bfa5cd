#!/bin/bash
# Live migration of the tiny guest between two uffdkit-vmm processes over loopback TCP,
# N times (default 5): prints each run's source line (downtime, postcopy) and destination
# line (RUN -> first instruction), and fails if a run does not end with the guest's
# checksum matching the source's model. Build first: cargo build --release -p uffdkit-tools --bin uffdkit-vmm
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$here/target/release/uffdkit-vmm}
N=${N:-5}
MIB=${MIB:-16}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
umask 077
printf 'uffdkit-vmm-figures-key-0123456789' > "$dir/key"
for i in $(seq 1 "$N"); do
  "$BIN" migrate-in --key-file "$dir/key" --mib "$MIB" > "$dir/in.$i" 2>&1 &
  pid=$!
  for _ in $(seq 200); do grep -q "listening on" "$dir/in.$i" && break; sleep 0.05; done
  addr=$(sed -n 's/^listening on //p' "$dir/in.$i")
  "$BIN" migrate-out --key-file "$dir/key" --mib "$MIB" --to "$addr" > "$dir/out.$i" 2>&1
  wait "$pid"
  grep -q "matches the source's model" "$dir/in.$i" || { cat "$dir/in.$i"; exit 1; }
  echo "run $i: $(grep '^migrated:' "$dir/out.$i")"
  echo "run $i: $(grep '^destination:' "$dir/in.$i")"
done
