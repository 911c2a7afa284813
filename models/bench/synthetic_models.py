#!/usr/bin/env python3
"""Writes the small random-weight GGUF files of tests/data/synthetic/ (F32
weights, so a comparison is about the architecture, not the kernels) and,
given llama.cpp's logits dumper (models/bench/llama_logits.cpp), records
llama.cpp's logits for a fixed token sequence on each beside it.

Usage:
  pip install gguf numpy
  python3 models/bench/synthetic_models.py tests/data/synthetic [PATH/TO/llama_logits [NAME,…]]
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


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# Merges of the Qwen 2 BPE vocabulary: enough that a pre-tokenizer splitting
# digits in threes, or not splitting punctuation, would give other ids.
QWEN2_MERGES = ["1 2", "12 3", "Ġ t", "h e", "Ġt he", "Ġ 1", "Ġ a", "a b", "' s", "Ġ Ġ", ". .", "Ċ Ċ", "o g", "f og"]


def qwen2_vocab(w):
    """A byte-level BPE vocabulary with the `qwen2` pre-tokenizer."""
    tokens = bytes_to_unicode()
    for m in QWEN2_MERGES:
        tokens.append(m.replace(" ", ""))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(QWEN2_MERGES)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    return len(tokens)


# Texts whose ids llama.cpp records for the Qwen 2 vocabulary.
TEXTS = ["the 123 fog", "12345 and 1 2 3", "it's the fog...\n\nthe end", "  ab  the", "tab\there ÿ ok", "<|im_start|>the"]


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


def qwen2(path):
    """Qwen 2: biases on Q, K and V, NeoX RoPE, tied output."""
    rng = np.random.default_rng(3)
    d, heads, kv, hd, ffn, layers = 64, 4, 2, 16, 128, 3
    w = gguf.GGUFWriter(str(path), "qwen2")
    n_vocab = qwen2_vocab(w)
    hparams(w, "qwen2", [("block_count", layers), ("context_length", 128), ("embedding_length", d),
                         ("feed_forward_length", ffn), ("attention.head_count", heads),
                         ("attention.head_count_kv", kv)],
            1000000.0, 1e-6)
    w.add_tensor("token_embd.weight", rand(rng, n_vocab, d, scale=1.0))
    for i in range(layers):
        b = block(w, rng, i, d, heads, kv, hd, ffn)
        w.add_tensor(b + "attn_q.bias", rand(rng, heads * hd, scale=0.5))
        w.add_tensor(b + "attn_k.bias", rand(rng, kv * hd, scale=0.5))
        w.add_tensor(b + "attn_v.bias", rand(rng, kv * hd, scale=0.5))
    w.add_tensor("output_norm.weight", norm(rng, d))
    return w


def qwen3(path):
    """Qwen 3: q/k RMSNorm per head, heads wider than d / heads, NeoX RoPE."""
    rng = np.random.default_rng(4)
    d, heads, kv, hd, ffn, layers = 64, 4, 2, 32, 128, 3
    w = gguf.GGUFWriter(str(path), "qwen3")
    n_vocab = vocab(w)
    hparams(w, "qwen3", [("block_count", layers), ("context_length", 128), ("embedding_length", d),
                         ("feed_forward_length", ffn), ("attention.head_count", heads),
                         ("attention.head_count_kv", kv), ("attention.key_length", hd),
                         ("attention.value_length", hd)],
            1000000.0, 1e-6)
    w.add_tensor("token_embd.weight", rand(rng, n_vocab, d, scale=1.0))
    for i in range(layers):
        b = block(w, rng, i, d, heads, kv, hd, ffn)
        w.add_tensor(b + "attn_q_norm.weight", norm(rng, hd))
        w.add_tensor(b + "attn_k_norm.weight", norm(rng, hd))
    w.add_tensor("output_norm.weight", norm(rng, d))
    w.add_tensor("output.weight", rand(rng, n_vocab, d))
    return w


def phi3(path):
    """Phi-3: fused QKV and gate/up tensors, NeoX RoPE."""
    rng = np.random.default_rng(5)
    d, heads, kv, hd, ffn, layers = 64, 4, 4, 16, 128, 3
    w = gguf.GGUFWriter(str(path), "phi3")
    n_vocab = vocab(w)
    hparams(w, "phi3", [("block_count", layers), ("context_length", 128), ("embedding_length", d),
                        ("feed_forward_length", ffn), ("attention.head_count", heads),
                        ("attention.head_count_kv", kv), ("rope.dimension_count", hd)],
            10000.0, 1e-5)
    w.add_tensor("token_embd.weight", rand(rng, n_vocab, d, scale=1.0))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(rng, d))
        w.add_tensor(b + "attn_qkv.weight", rand(rng, heads * hd + 2 * kv * hd, d))
        w.add_tensor(b + "attn_output.weight", rand(rng, d, heads * hd))
        w.add_tensor(b + "ffn_norm.weight", norm(rng, d))
        w.add_tensor(b + "ffn_up.weight", rand(rng, 2 * ffn, d))
        w.add_tensor(b + "ffn_down.weight", rand(rng, d, ffn))
    w.add_tensor("output_norm.weight", norm(rng, d))
    w.add_tensor("output.weight", rand(rng, n_vocab, d))
    return w


def tokenize(server, path):
    """llama.cpp's ids for TEXTS (llama-server's /tokenize, no specials added,
    control tokens parsed)."""
    import time
    import urllib.request
    port = 18571
    proc = subprocess.Popen([str(server), "-m", str(path), "--port", str(port), "-c", "128", "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        out = []
        for text in TEXTS:
            body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", data=body, headers={"Content-Type": "application/json"})
            ids = json.loads(urllib.request.urlopen(req, timeout=10).read())["tokens"]
            out.append({"text": text, "ids": ids})
        return {"engine": "llama.cpp (llama-server /tokenize) vendored in llama-cpp-python 0.3.36", "cases": out}
    finally:
        proc.terminate()
        proc.wait()


def main():
    out = Path(sys.argv[1])
    dumper = sys.argv[2] if len(sys.argv) > 2 else None
    out.mkdir(parents=True, exist_ok=True)
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    makers = [("llama-rope-freqs", llama_rope_freqs), ("gemma3", gemma3), ("qwen2", qwen2), ("qwen3", qwen3), ("phi3", phi3)]
    for name, make in makers:
        if only and name not in only:
            continue
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
            if name == "qwen2":
                server = Path(dumper).parent / "llama.cpp/build/bin/llama-server"
                (out / "qwen2.tokens.json").write_text(json.dumps(tokenize(server, path)) + "\n")
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
