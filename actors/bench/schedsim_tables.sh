#!/usr/bin/env bash
# Runs the scheduling simulator over seeds and prints, per cluster and load,
# the median over seeds of each policy's metrics and the p99 ratios the
# scheduling issue targets. Usage: actors/bench/schedsim_tables.sh [SEEDS]
# (LINKS=fog for edge access links instead of wired ones; CLUSTERS and LOADS
# to pick cells, e.g. CLUSTERS="10 100" LOADS=0.8).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seeds=${1:-5}
cargo build --release --manifest-path "$root/Cargo.toml" -p fogmesh-actors --features sim --example schedsim >&2
sim="$root/target/release/examples/schedsim"
out=$(mktemp)
for peers in ${CLUSTERS:-classic 10 100}; do
  for load in ${LOADS:-0.5 0.8 0.95}; do
    for seed in $(seq "$seeds"); do
      printf '{"peers":"%s","load":%s,"seed":%s,"result":%s}\n' "$peers" "$load" "$seed" \
        "$("$sim" --links "${LINKS:-lan}" --peers "$peers" --load "$load" --seed "$seed" --json)" >> "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault((r["peers"], r["load"]), []).append(r["result"])
med = lambda xs: statistics.median(xs)
for (peers, load), runs in groups.items():
    print(f"\n**{peers} peers, load {load}** (median of {len(runs)} seeds)\n")
    print("| policy | mean s | p50 s | p99 s | tasks/s | load variance | msgs/task | msgs/task/candidate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in ["greedy", "round_robin", "random", "p2c", "bidding", "oracle"]:
        m = {k: med([r[p][k] for r in runs]) for k, v in runs[0][p].items() if isinstance(v, (int, float))}
        print(f"| {p} | {m['mean_s']:.3f} | {m['p50_s']:.3f} | {m['p99_s']:.3f} | {m['throughput']:.1f} | "
              f"{m['load_variance']:.4f} | {m['messages_per_task']:.2f} | {m['messages_per_task_per_candidate']:.2f} |")
    g = med([r["bidding"]["p99_s"] / r["greedy"]["p99_s"] for r in runs])
    o = med([r["bidding"]["p99_s"] / r["oracle"]["p99_s"] for r in runs])
    print(f"\nbidding p99 / greedy p99 = {g:.2f}x, bidding p99 / oracle p99 = {o:.2f}x (medians of per-seed ratios)")
PY
rm -f "$out"
