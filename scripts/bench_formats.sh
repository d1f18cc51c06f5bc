#!/usr/bin/env bash
# pp512 and tg128 (llama-bench's two figures) for each line of flags read from stdin, one binary,
# one Markdown row per line: `marlin bench` prefill of 512 tokens, then 128 decode tokens from an
# empty context, mean ± sd of 3 runs each. Usage:
#   printf '%s\n' '--quantize int4' '--quantize int8' | scripts/bench_formats.sh [MARLIN_BINARY]
set -euo pipefail
marlin=${1:-target/release/marlin}
while IFS= read -r flags; do
  # shellcheck disable=SC2086 # the flags are meant to split
  pp=$("$marlin" bench $flags --prompt-tokens 512 --gen-tokens 1 --repetitions 3 --json)
  # shellcheck disable=SC2086
  tg=$("$marlin" bench $flags --prompt-tokens 1 --gen-tokens 128 --repetitions 3 --json)
  python3 - "$flags" "$pp" "$tg" <<'PY'
import json, sys
flags, pp, tg = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
cell = lambda d, k: f"{d[k]:.1f} ± {d[k + '_sd']:.1f}"
print(f"| `{flags or '(default)'}` | {cell(pp, 'prefill_tok_s')} | {cell(tg, 'decode_tok_s')} | {pp['backend']} |", flush=True)
PY
done
