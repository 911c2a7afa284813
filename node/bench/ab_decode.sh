#!/usr/bin/env bash
# A/B of two fogmesh builds in one run: engine decode (`fogmesh bench`, one
# process) and 3-peer mesh decode (`mesh_bench --only decode`), rounds
# interleaved A, B, A, B... Each side is a release dir holding `fogmesh`
# and `examples/mesh_bench` (mesh_bench starts the `fogmesh` beside it).
#
#   node/bench/ab_decode.sh A_DIR B_DIR [ROUNDS=3]
#
# Prints per-round figures and, per side, the median over rounds, then B/A.
set -euo pipefail
a=$1; b=$2; rounds=${3:-3}
out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  for side in a b; do
    dir=$a; [ "$side" = b ] && dir=$b
    "$dir/fogmesh" bench --threads 1 --prompt-tokens 128 --gen-tokens 64 --reps 5 --json >"$out/engine-$side-$r.json"
    "$dir/examples/mesh_bench" --only decode --reps 3 >"$out/mesh-$side-$r.txt"
    echo "round $r $side: engine $(python3 -c "import json,sys; d=json.load(open('$out/engine-$side-$r.json')); print(f\"pp128 {d['prefill_tok_s_median']:.1f} tg64 {d['decode_tok_s_median']:.1f}\")"); $(grep '^decode tok/s' "$out/mesh-$side-$r.txt")"
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def med(xs): return statistics.median(xs)
rows = {}
for side in "ab":
    pp, tg, p1, d3 = [], [], [], []
    for r in range(1, rounds + 1):
        e = json.load(open(f"{out}/engine-{side}-{r}.json"))
        pp.append(e["prefill_tok_s_median"]); tg.append(e["decode_tok_s_median"])
        m = open(f"{out}/mesh-{side}-{r}.txt").read()
        x = re.search(r"one process 1 thread ([\d.]+), \d+ threads [\d.]+; 3 peers \(1 thread each\) ([\d.]+)", m)
        p1.append(float(x.group(1))); d3.append(float(x.group(2)))
    rows[side] = dict(pp=med(pp), tg=med(tg), p1=med(p1), d3=med(d3))
print("| figure | A | B | B/A |")
print("|---|---:|---:|---:|")
for k, name in [("pp", "engine prefill pp128 tok/s (1 thread)"), ("tg", "engine decode tg64 tok/s (1 thread)"),
                ("p1", "one-process decode tok/s (mesh_bench, 1 thread)"), ("d3", "3-peer mesh decode tok/s (1 thread each)")]:
    print(f"| {name} | {rows['a'][k]:.1f} | {rows['b'][k]:.1f} | {rows['b'][k] / rows['a'][k]:.3f}x |")
PY
