#!/usr/bin/env bash
# Many users at once: OpenAI streaming clients (greedy, 64 tokens) at 1, 4,
# 8 and 32 concurrent streams against llama-server and fogmesh, in one run.
#
#   node/bench/concurrent.sh [ROUNDS]      (default 1)
#   THREE_PEERS_ONLY=1 node/bench/concurrent.sh [ROUNDS]   (the 3-peer rows alone)
#
# Needs: target/release/fogmesh, the default model, and llama-server built
# from the source vendored in llama-cpp-python 0.3.36 at
# .bench/llama.cpp/build/bin/llama-server (see models/bench/compare_llama_cpp.sh).
# Each round: llama-server -np 32 -t 2 -tb 2 -c 16384; one fogmesh node
# --threads 2; three fogmesh peers on loopback with 1 thread each (32
# streams), split in three stages and then as three whole replicas; then time to first token with a shared 400-token system prompt
# against the same length unshared, on the one node.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-1}
MODEL=${FOGMESH_MODEL:-$HOME/.cache/fogmesh/models/SmolLM2-135M-Instruct.Q4_1.gguf}
LS=.bench/llama.cpp/build/bin/llama-server
BIN=target/release/fogmesh
S=node/bench/streams.py
wait_up() { for _ in $(seq 1 120); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 0.5; done; echo "no server at $1" >&2; exit 1; }
load() { # URL LABEL
  for c in 1 4 8 32; do
    n=$(( c * 2 > 8 ? c * 2 : 8 ))
    echo "$2 c=$c $(python3 $S --url "$1" --concurrency $c --requests $n --max-tokens 64 --json)"
  done
}
three_peers() { # ROUND LABEL [--max-memory SIZE]: three peers, 1 thread each, 32 streams
  local r=$1 label=$2; shift 2
  local pids=() i boot stages serving
  rm -rf "$tmp"/p[123] "$tmp/p1.addr"
  for i in 1 2 3; do
    boot=()
    [ "$i" -gt 1 ] && boot=(--bootstrap "$(cat "$tmp/p1.addr")")
    FOGMESH_HOME=$tmp/p$i $BIN node --model "$MODEL" --threads 1 --no-mdns "$@" \
      --http 127.0.0.1:$((18480 + i)) --listen /ip4/127.0.0.1/tcp/$((18490 + i)) "${boot[@]}" >"$tmp/p$i.log" 2>&1 & pids+=($!)
    [ "$i" -eq 1 ] && { wait_up http://127.0.0.1:18481; echo "/ip4/127.0.0.1/tcp/18491/p2p/$(curl -s http://127.0.0.1:18481/status | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')" >"$tmp/p1.addr"; }
  done
  # Until all three serve (one pipeline over them, or three replicas).
  for _ in $(seq 1 120); do
    read -r stages serving < <(curl -s http://127.0.0.1:18481/plan | python3 -c 'import json,sys; v=json.load(sys.stdin); print(len(v["route"]), len({h["peer"] for r in v["routes"] for h in r}))' 2>/dev/null || echo "0 0")
    [ "$serving" = 3 ] && break; sleep 0.5
  done
  sleep 2
  echo "round=$r $label stages=$stages serving=$serving c=32 $(python3 $S --url http://127.0.0.1:18481 --concurrency 32 --requests 64 --max-tokens 64 --json)"
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
}
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  if [ -z "${THREE_PEERS_ONLY:-}" ]; then
  $LS -m "$MODEL" -np 32 -t 2 -tb 2 -c 16384 --port 18470 >"$tmp/ls.log" 2>&1 & pid=$!
  wait_up http://127.0.0.1:18470; load http://127.0.0.1:18470 "round=$r llama-server"; kill $pid; wait $pid 2>/dev/null || true
  FOGMESH_HOME=$tmp/one $BIN node --model "$MODEL" --threads 2 --no-mdns --http 127.0.0.1:18469 --listen /ip4/127.0.0.1/tcp/0 >"$tmp/one.log" 2>&1 & pid=$!
  wait_up http://127.0.0.1:18469; load http://127.0.0.1:18469 "round=$r fogmesh-1node"
  echo "round=$r prefix-shared $(python3 $S --url http://127.0.0.1:18469 --concurrency 1 --requests 9 --max-tokens 8 --system-tokens 400 --json)"
  echo "round=$r prefix-unshared $(python3 $S --url http://127.0.0.1:18469 --concurrency 1 --requests 9 --max-tokens 8 --system-tokens 400 --unique-system --json)"
  kill $pid; wait $pid 2>/dev/null || true
  fi
  # Three peers planned as three stages: each offers 95 % of the file (71 %
  # for weights), too little for the whole model, with the KV room an
  # uncapped node has (a quarter of 95 % of the file would hold only ~22 MB
  # of caches: sessions would wait for room); then the same three with no
  # cap, each holding a whole replica.
  three_peers "$r" fogmesh-3peers-split --max-memory $(( $(stat -c %s "$MODEL") * 95 / 100 )) --kv-budget 1GiB
  three_peers "$r" fogmesh-3peers-replicas
done
