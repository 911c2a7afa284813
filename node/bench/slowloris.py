#!/usr/bin/env python3
"""GET /health latency of a fogmesh node alone, then beside IDLE idle
connections and SLOW slowloris connections (one header byte per 300 ms,
never finished), in the same run. Starts its own node (no model) from
BIN, on loopback.

    python3 node/bench/slowloris.py [BIN] [IDLE] [SLOW] [ROUNDS]

Defaults: target/release/fogmesh 300 20 30. Prints the median and worst
latency of each phase, and how many of the held connections the node had
closed by the end (its header deadline is 15 s).
"""
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/fogmesh"
IDLE = int(sys.argv[2]) if len(sys.argv) > 2 else 300
SLOW = int(sys.argv[3]) if len(sys.argv) > 3 else 20
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 30


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def health(port):
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    out = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        out += b
    s.close()
    assert out.startswith(b"HTTP/1.1 200"), out[:80]
    return time.perf_counter() - t


def phase(port, name):
    xs = [health(port) for _ in range(ROUNDS)]
    print(f"{name}: median {statistics.median(xs) * 1e3:.2f} ms, worst {max(xs) * 1e3:.2f} ms over {ROUNDS} requests")
    return statistics.median(xs)


def closed(s):
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main():
    port = free_port()
    home = tempfile.mkdtemp()
    node = subprocess.Popen(
        [BIN, "node", "--http", f"127.0.0.1:{port}", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--data-dir", home],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "FOGMESH_HOME": home})
    try:
        for _ in range(100):
            try:
                health(port)
                break
            except OSError:
                time.sleep(0.1)
        alone = phase(port, "alone")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        slow = []
        for _ in range(SLOW):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            slow.append(s)
        stop = threading.Event()

        def drip():
            while not stop.is_set():
                for s in slow:
                    try:
                        s.sendall(b"a")
                    except OSError:
                        pass
                time.sleep(0.3)

        t = threading.Thread(target=drip)
        t.start()
        time.sleep(0.5)
        loaded = phase(port, f"beside {IDLE} idle + {SLOW} slowloris connections")
        print(f"ratio loaded/alone (medians): {loaded / alone:.2f}")
        time.sleep(16)
        stop.set()
        t.join()
        gone = sum(closed(s) for s in idle + slow)
        print(f"after 16 s: {gone} of {IDLE + SLOW} held connections closed by the node")
    finally:
        node.terminate()
        node.wait()


if __name__ == "__main__":
    main()
