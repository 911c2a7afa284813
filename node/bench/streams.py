#!/usr/bin/env python3
"""OpenAI streaming clients against one server, N at a time.

    streams.py --url http://127.0.0.1:8469 --concurrency 8 --requests 32 \
        --max-tokens 64 [--system-tokens 400] [--json]

Each client posts /v1/chat/completions with stream=true, greedy, and counts
the content chunks it receives (one per token on fogmesh and llama-server).
Prints aggregate tokens/s over the whole run, time to first token (p50,
p99) and the number of failed requests. A run with any failed request is
reported as failed: its throughput is not to be used.

Plain asyncio sockets, no third-party modules.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

TOPICS = [
    "the history of bridges", "how rain forms", "a day in a lighthouse", "why cats purr",
    "the first computers", "a trip to the mountains", "how bread is made", "the life of a bee",
    "the moon landing", "how trains work", "a city at night", "the ocean floor",
]


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def one(host, port, path, body, headers):
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    code = int(status.split()[1]) if len(status.split()) > 1 else 0
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    if code != 200:
        rest = await reader.read()
        writer.close()
        return {"ok": False, "why": f"HTTP {code}: {rest[:200]!r}"}
    first = None
    tokens = 0
    buf = b""
    done = False

    async def raw():
        if not chunked:
            return await reader.read(65536)
        size_line = await reader.readline()
        if not size_line:
            return b""
        size = int(size_line.strip().split(b";")[0] or b"0", 16)
        if size == 0:
            return b""
        chunk = await reader.readexactly(size)
        await reader.readline()
        return chunk

    while not done:
        got = await raw()
        if not got:
            break
        buf += got
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    msg = json.loads(payload)
                except ValueError:
                    continue
                if "error" in msg:
                    writer.close()
                    return {"ok": False, "why": str(msg["error"])[:200]}
                for ch in msg.get("choices", []):
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - t0
    writer.close()
    if first is None:
        return {"ok": False, "why": "no token came"}
    return {"ok": True, "ttft": first, "tokens": tokens, "secs": time.perf_counter() - t0}


async def served_model(host, port):
    """The first model GET /v1/models lists."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return json.loads(body)["data"][0]["id"]


async def run(args):
    u = urlparse(args.url)
    host, port = u.hostname, u.port or 80
    if not args.model:
        args.model = await served_model(host, port)
    system = None
    if args.system_tokens:
        # About one token per word of this text.
        words = ("You are a helpful assistant who answers carefully and at length. " * 200).split()
        system = " ".join(words[: args.system_tokens])
    sem = asyncio.Semaphore(args.concurrency)
    results = []

    async def worker(i):
        async with sem:
            messages = []
            if system:
                # With --unique-system, no two requests share a prefix.
                text = f"Request {i} of {args.requests}. {system}" if args.unique_system else system
                messages.append({"role": "system", "content": text})
            messages.append({"role": "user", "content": f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}. Request {i}."})
            body = {
                "model": args.model,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            if args.ignore_eos:
                body["ignore_eos"] = True
            try:
                results.append(await one(host, port, "/v1/chat/completions", body, {}))
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                results.append({"ok": False, "why": repr(e)})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    out = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "failed": len(failed),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1) if not failed else None,
        "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1),
        "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
        "mean_tokens": round(tokens / max(1, len(ok)), 1),
    }
    if failed:
        out["first_failure"] = failed[0]["why"]
    print(json.dumps(out) if args.json else out)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8469")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=0)
    ap.add_argument("--unique-system", action="store_true", help="start each system prompt differently (no shared prefix)")
    ap.add_argument("--model", default="", help="default: the first GET /v1/models lists")
    ap.add_argument("--ignore-eos", action="store_true", help="ask the server not to stop at end of sequence (llama-server)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
