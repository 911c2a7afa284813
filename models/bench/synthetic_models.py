#!/usr/bin/env python3
"""Writes the small random-weight GGUF files of tests/data/synthetic/ (F32
weights, so a comparison is about the architecture, not the kernels) and,
given llama.cpp's logits dumper (models/bench/llama_logits.cpp), records
llama.cpp's logits for a fixed token sequence on each beside it.

Usage:
  pip install gguf numpy
  python3 models/bench/synthetic_models.py tests/data/synthetic [PATH/TO/llama_logits]
"""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

TOKENS = [1, 17, 42, 99, 7, 200, 3, 64, 150, 11, 250, 33, 5, 128, 77, 19]


def vocab(w):
    # A SentencePiece-style vocabulary llama.cpp accepts: 3 specials and the
    # 256 byte tokens (it looks up <0x0A> for newlines).
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return len(tokens)


def rand(rng, *shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def norm(rng, n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def hparams(w, arch, pairs, base, eps):
    """The architecture's integer hyper-parameters, RoPE base and epsilon."""
    for k, v in pairs:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", base)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", eps)


def block(w, rng, i, d, heads, kv, hd, ffn):
    """The tensors every architecture here shares in block `i`."""
    b = f"blk.{i}."
    w.add_tensor(b + "attn_norm.weight", norm(rng, d))
    w.add_tensor(b + "attn_q.weight", rand(rng, heads * hd, d))
    w.add_tensor(b + "attn_k.weight", rand(rng, kv * hd, d))
    w.add_tensor(b + "attn_v.weight", rand(rng, kv * hd, d))
    w.add_tensor(b + "attn_output.weight", rand(rng, d, heads * hd))
    w.add_tensor(b + "ffn_norm.weight", norm(rng, d))
    w.add_tensor(b + "ffn_gate.weight", rand(rng, ffn, d))
    w.add_tensor(b + "ffn_up.weight", rand(rng, ffn, d))
    w.add_tensor(b + "ffn_down.weight", rand(rng, d, ffn))
    return b


def llama_rope_freqs(path):
    """Llama with RoPE frequency factors (Llama 3.1/3.2 files carry them)."""
    rng = np.random.default_rng(1)
    d, heads, kv, hd, ffn, layers = 64, 4, 2, 16, 128, 2
    w = gguf.GGUFWriter(str(path), "llama")
    n_vocab = vocab(w)
    hparams(w, "llama", [("block_count", layers), ("context_length", 128), ("embedding_length", d),
                         ("feed_forward_length", ffn), ("attention.head_count", heads),
                         ("attention.head_count_kv", kv), ("rope.dimension_count", hd), ("vocab_size", n_vocab)],
            500000.0, 1e-5)
    w.add_tensor("token_embd.weight", rand(rng, n_vocab, d, scale=1.0))
    w.add_tensor("rope_freqs.weight", np.array([1.0, 1.0, 1.5, 2.0, 4.0, 8.0, 8.0, 8.0], dtype=np.float32))
    for i in range(layers):
        block(w, rng, i, d, heads, kv, hd, ffn)
    w.add_tensor("output_norm.weight", norm(rng, d))
    w.add_tensor("output.weight", rand(rng, n_vocab, d))
    return w


def gemma3(path):
    """Gemma 3 with a window of 4 (so 16 tokens cross it), 7 layers (one global)."""
    rng = np.random.default_rng(2)
    d, heads, kv, hd, ffn, layers = 64, 2, 1, 32, 128, 7
    w = gguf.GGUFWriter(str(path), "gemma3")
    n_vocab = vocab(w)
    hparams(w, "gemma3", [("block_count", layers), ("context_length", 128), ("embedding_length", d),
                          ("feed_forward_length", ffn), ("attention.head_count", heads),
                          ("attention.head_count_kv", kv), ("attention.key_length", hd),
                          ("attention.value_length", hd), ("attention.sliding_window", 4), ("vocab_size", n_vocab)],
            1000000.0, 1e-6)
    w.add_tensor("token_embd.weight", rand(rng, n_vocab, d, scale=0.1))
    for i in range(layers):
        b = block(w, rng, i, d, heads, kv, hd, ffn)
        w.add_tensor(b + "attn_q_norm.weight", norm(rng, hd))
        w.add_tensor(b + "attn_k_norm.weight", norm(rng, hd))
        w.add_tensor(b + "post_attention_norm.weight", norm(rng, d))
        w.add_tensor(b + "post_ffw_norm.weight", norm(rng, d))
    w.add_tensor("output_norm.weight", norm(rng, d))
    return w


def main():
    out = Path(sys.argv[1])
    dumper = sys.argv[2] if len(sys.argv) > 2 else None
    out.mkdir(parents=True, exist_ok=True)
    for name, make in [("llama-rope-freqs", llama_rope_freqs), ("gemma3", gemma3)]:
        path = out / f"{name}.gguf"
        w = make(path)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if dumper:
            run = subprocess.run([dumper, str(path), ",".join(map(str, TOKENS))], capture_output=True, text=True, check=True)
            ref = json.loads(run.stdout)
            ref = {"tokens": TOKENS, "engine": "llama.cpp vendored in llama-cpp-python 0.3.36, CPU, 1 thread",
                   "logits": [[round(x, 5) for x in row] for row in ref["logits"]]}
            (out / f"{name}.logits.json").write_text(json.dumps(ref) + "\n")
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
