#!/usr/bin/env bash
# Where a CUDA decode step's time goes: each decode kernel of llama3-8b (synthetic int4 weights,
# 512-token prompt) timed alone by Nsight Compute, summed by kernel name, for each batch size
# given. Alone, a kernel has none of the programmatic overlap it gets in the replayed step, so
# the sums exceed the step's time; they rank the launches. Needs ncu (on the device machine:
# /usr/local/cuda/bin/ncu). Usage:
#   scripts/profile_decode.sh [MARLIN_BINARY] BATCH...
set -euo pipefail
marlin=target/release/marlin
if [[ $# -gt 0 && ! $1 =~ ^[0-9]+$ ]]; then
  marlin=$1
  shift
fi
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
# The decode-only kernels (prefill runs qgemm and attention_prefill), two steps' worth of them.
kernels='regex:qgemv_int4|qglu|attention_tc|attention_rope|attention_decode|quantize_x'
for batch in "$@"; do
  echo "batch $batch"
  "$ncu" --csv --page raw --metrics gpu__time_duration.sum --graph-profiling node \
    --cache-control none --clock-control none -k "$kernels" -c 400 \
    "$marlin" bench --synthetic llama3-8b --quantize int4 --device cuda --batch "$batch" \
    --gen-tokens 3 --repetitions 1 2>/dev/null |
    python3 -c '
import collections, csv, sys
lines = sys.stdin.read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith("\"ID\""))
total = collections.defaultdict(lambda: [0, 0.0])
for row in csv.DictReader(lines[start:]):
    ns = row["gpu__time_duration.sum"].replace(",", "")
    if ns.replace(".", "").isdigit():
        t = total[row["Kernel Name"].split("(")[0]]
        t[0] += 1
        t[1] += float(ns)
for name, (n, ns) in sorted(total.items(), key=lambda kv: -kv[1][1]):
    print(f"  {name:32} {n:4} launches {ns / n / 1e3:8.2f} us each")
'
done
