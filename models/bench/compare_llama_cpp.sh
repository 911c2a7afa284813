#!/usr/bin/env bash
# Runs `fogmesh bench` beside llama.cpp's llama-bench on the same GGUF file,
# same thread counts, interleaved in rounds (the machines are noisy), and
# prints medians and ratios as a Markdown table.
#
# llama.cpp is built once into .bench/ from the source vendored in PyPI's
# llama-cpp-python 0.3.36 sdist (its AMX kernel dies on our hosts, hence the
# explicit ISA flags).
#
# Usage: models/bench/compare_llama_cpp.sh [ROUNDS] [THREADS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work="$root/.bench"
rounds=${1:-3}
shift || true
threads=("${@:-1 2}")
threads=(${threads[@]})
mkdir -p "$work"

cargo build --release --manifest-path "$root/Cargo.toml" --bin fogmesh >&2
fogmesh="$root/target/release/fogmesh"
model=${FOGMESH_MODEL:-$("$fogmesh" fetch --quiet)}

bench="$work/llama.cpp/build/bin/llama-bench"
if [ ! -x "$bench" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$work/sdist" >&2
  tar xzf "$work"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$work"
  rm -rf "$work/llama.cpp"
  mv "$work/llama_cpp_python-0.3.36/vendor/llama.cpp" "$work/llama.cpp"
  cmake -S "$work/llama.cpp" -B "$work/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_RPC=ON >&2
  cmake --build "$work/llama.cpp/build" -j"$(nproc)" --target llama-bench ggml-rpc-server >&2
fi

out="$work/compare-$(date +%Y%m%d-%H%M%S).jsonl"
for r in $(seq "$rounds"); do
  for t in "${threads[@]}"; do
    "$bench" -m "$model" -t "$t" -p 128 -n 64 -r 5 -o jsonl 2>/dev/null \
      | sed "s/^/{\"who\":\"llama.cpp\",\"round\":$r,\"row\":/; s/\$/}/" >> "$out"
    "$fogmesh" bench --model "$model" --threads "$t" --prompt-tokens 128 --gen-tokens 64 --reps 5 --json \
      | sed "s/^/{\"who\":\"fogmesh\",\"round\":$r,\"row\":/; s/\$/}/" >> "$out"
  done
done
echo "raw results: $out" >&2

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
res = {}
for r in rows:
    x = r["row"]
    if r["who"] == "llama.cpp":
        t = x["n_threads"]
        key = "prefill" if x["n_prompt"] > 0 else "decode"
        res.setdefault((t, key, "llama.cpp"), []).append(x["avg_ts"])
    else:
        t = x["threads"]
        res.setdefault((t, "prefill", "fogmesh"), []).append(x["prefill_tok_s_median"])
        res.setdefault((t, "decode", "fogmesh"), []).append(x["decode_tok_s_median"])
print("| threads | test | llama.cpp tok/s | fogmesh tok/s | fogmesh / llama.cpp |")
print("|---:|---|---:|---:|---:|")
for t in sorted({k[0] for k in res}):
    for test, label in (("prefill", "pp128"), ("decode", "tg64")):
        l = statistics.median(res[(t, test, "llama.cpp")])
        f = statistics.median(res[(t, test, "fogmesh")])
        print(f"| {t} | {label} | {l:.1f} | {f:.1f} | {f / l:.2f}x |")
PY
