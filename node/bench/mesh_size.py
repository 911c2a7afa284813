#!/usr/bin/env python3
"""Idle cost of a mesh by its size: N `fogmesh node` processes (no model) on
loopback, mDNS off, joined through the first two as bootstrap peers.

For each N: the time to a full view (the first, a middle and the last node
started each list every other in /status), then, 15 s later, over 10 s:
CPU per node (mean over all nodes of /proc utime+stime), RSS per node,
open connections per node (max over the non-bootstrap nodes, and mean),
distinct connected peers (when the binary reports them) and
gossip bytes received per node per second (from /status, when the binary
reports it).

Usage: node/bench/mesh_size.py BINARY [N ...] [--label NAME] [--json FILE]
(default N: 12 24 48 64). Prints one table row per N. Environment: WATCH=K
prints connections K times, 5 s apart, after the full view (SS=1 adds the
busiest node's sockets); NODE_LOG sets the nodes' RUST_LOG (default warn);
KEEP=1 keeps their logs.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def status(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.load(r)
    except Exception:
        return None


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(binary, n, base_port):
    work = tempfile.mkdtemp(prefix=f"meshsize{n}-")
    procs, ids = [], []
    try:
        boot = []
        t_start = time.time()
        for i in range(n):
            p2p, http = base_port + 2 * i, base_port + 2 * i + 1
            args = [binary, "node", "--no-mdns", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
                    "--http", f"127.0.0.1:{http}", "--data-dir", os.path.join(work, str(i))]
            for b in boot:
                args += ["--bootstrap", b]
            log = open(os.path.join(work, f"{i}.log"), "w")
            env = dict(os.environ, RUST_LOG=os.environ.get("NODE_LOG", "warn"))
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), http))
            if i < 2:
                # Its identity, for the others' bootstrap address.
                t0 = time.time()
                while (s := status(http)) is None:
                    if time.time() - t0 > 60:
                        raise RuntimeError(f"node {i} did not come up; see {work}/{i}.log")
                    time.sleep(0.1)
                boot.append(f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{s['peer_id']}")
        for _, http in procs:
            t0 = time.time()
            while (s := status(http)) is None:
                if time.time() - t0 > 120:
                    raise RuntimeError("a node did not come up")
                time.sleep(0.1)
            ids.append(s["peer_id"])
        t_last = time.time()
        sample = [0, n // 2, n - 1]
        deadline = time.time() + 600
        while True:
            full = True
            for i in sample:
                s = status(procs[i][1])
                seen = {p["peer_id"] for p in (s or {}).get("peers", []) if p.get("gflops", 0) > 0}
                if not all(x in seen for j, x in enumerate(ids) if j != i):
                    full = False
                    break
            if full:
                break
            if time.time() > deadline:
                raise RuntimeError("no full view in 600 s")
            time.sleep(0.2)
        view_s = time.time() - t_last
        for _ in range(int(os.environ.get("WATCH", "0"))):
            c = [(status(h) or {}).get("connected_peers", -1) for _, h in procs]
            top = max(range(2, n), key=lambda i: c[i])
            port = 20000 + 300 * 0 + 2 * top if False else None
            print(f"  +{time.time() - t_last:.0f} s: connected max {max(c[2:])} mean {statistics.mean(c):.1f} top {sorted(c)[-4:]} (node {top}, pid {procs[top][0].pid})", flush=True)
            if os.environ.get("SS"):
                pid = procs[top][0].pid
                out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
                mine = [l for l in out.splitlines() if f"pid={pid}," in l]
                lport = procs[top][1] - 1
                inbound = sum(1 for l in mine if l.split()[2].endswith(f":{lport}"))
                print(f"    sockets {len(mine)} inbound {inbound} outbound {len(mine) - inbound}", flush=True)
            time.sleep(5)
        time.sleep(15)
        c0 = [cpu_s(p.pid) for p, _ in procs]
        g0 = [(status(h) or {}).get("gossip_rx_bytes") for _, h in procs]
        t0 = time.time()
        time.sleep(10)
        c1 = [cpu_s(p.pid) for p, _ in procs]
        g1 = [(status(h) or {}).get("gossip_rx_bytes") for _, h in procs]
        dt = time.time() - t0
        st = [status(h) or {} for _, h in procs]
        conns = [s.get("connections", 0) for s in st]
        peers_ = [s["connected_peers"] for s in st if "connected_peers" in s]
        gossip = [(b - a) / dt for a, b in zip(g0, g1) if a is not None and b is not None]
        return {
            "peers": n,
            "start_s": round(t_last - t_start, 2),
            "full_view_s": round(view_s, 2),
            "cpu_pct_mean": round(100 * statistics.mean((b - a) / dt for a, b in zip(c0, c1)), 2),
            "rss_mib_mean": round(statistics.mean(rss_mib(p.pid) for p, _ in procs), 1),
            "connected_max_nonbootstrap": max(conns[2:]) if n > 2 else max(conns),
            "connected_mean": round(statistics.mean(conns), 1),
            "connected_bootstrap": conns[:2],
            "connected_peers_max_nonbootstrap": max(peers_[2:]) if len(peers_) > 2 else None,
            "gossip_rx_bytes_per_s_mean": round(statistics.mean(gossip)) if gossip else None,
        }
    finally:
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP"):
            print(f"  logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    label, out = None, None
    if "--label" in args:
        i = args.index("--label")
        label = args[i + 1]
        del args[i:i + 2]
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    binary, sizes = args[0], [int(a) for a in args[1:]] or [12, 24, 48, 64]
    rows = []
    print("| binary | peers | full view (s) | connections, max non-bootstrap (mean; bootstraps) | distinct peers, max non-bootstrap | idle CPU per node | RSS per node | gossip bytes/s per node |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, n in enumerate(sizes):
        r = run(binary, n, 20000 + 300 * i)
        r["binary"] = label or binary
        rows.append(r)
        g = r["gossip_rx_bytes_per_s_mean"]
        d = r["connected_peers_max_nonbootstrap"]
        print(f"| {r['binary']} | {n} | {r['full_view_s']} | {r['connected_max_nonbootstrap']} ({r['connected_mean']}; {r['connected_bootstrap']}) | {d if d is not None else 'n/a'} "
              f"| {r['cpu_pct_mean']} % | {r['rss_mib_mean']} MiB | {g if g is not None else 'n/a'} |", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
