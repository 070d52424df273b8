"""Link probes between two namespaces: a TCP bulk transfer (bandwidth) and a one-byte ping-pong
(round trip). Standard library only: run it with any Python inside a namespace,

    ip netns exec emrig-cpu-fast python probe.py serve 10.213.0.3 5201
    ip netns exec emrig-gpu-0 python probe.py send 10.213.0.3 5201 8000000   # prints JSON

The sender writes `nbytes`, half-closes, and waits for the receiver's acknowledgement that it
read them all, so the time covers delivery, not buffering. Then 200 one-byte round trips
(TCP_NODELAY) give the median round trip.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

CHUNK = 1 << 20


def serve(host: str, port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = conn.recv(32).split(b"\n", 1)
    expected, rest = int(header[0]), len(header[1])
    buf = bytearray(CHUNK)
    got = rest
    while got < expected:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    conn.sendall(b"k")
    while True:  # ping-pong until the sender closes
        b = conn.recv(1)
        if not b:
            break
        conn.sendall(b)
    conn.close()


def send(host: str, port: int, nbytes: int, pings: int = 200) -> dict[str, float]:
    conn = socket.create_connection((host, port), timeout=60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = b"\0" * CHUNK
    t0 = time.perf_counter()
    conn.sendall(f"{nbytes}\n".encode())
    sent = 0
    while sent < nbytes:
        chunk = data[: min(CHUNK, nbytes - sent)]
        conn.sendall(chunk)
        sent += len(chunk)
    assert conn.recv(1) == b"k"
    transfer_s = time.perf_counter() - t0
    rtts = []
    for _ in range(pings):
        t = time.perf_counter()
        conn.sendall(b"p")
        conn.recv(1)
        rtts.append(time.perf_counter() - t)
    conn.close()
    return {
        "bytes": nbytes,
        "transfer_s": transfer_s,
        "gbps": nbytes * 8 / transfer_s / 1e9,
        "rtt_us": statistics.median(rtts) * 1e6,
        "rtt_p10_us": sorted(rtts)[len(rtts) // 10] * 1e6,
    }


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        serve(host, port)
    else:
        print(json.dumps(send(host, port, int(sys.argv[4]))))
