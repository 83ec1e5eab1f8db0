"""Load test of `rmbert serve` on 127.0.0.1: 100 candidates x 50 history per request, p=4, D=384.

Starts the server in a subprocess, measures one client's latency, then drives it with a bounded
number of concurrent clients (loopback only) twice: closed loop (each client sends again as
soon as it has its answer: the most the server sustains) and open loop at a fixed offered rate
(100 req/s). Prints one JSON object (last line): req/s, p50 and p99 latency of each. The load
generator runs on the same cores as the server. Usage: python benchmarks/serve_load.py
[--clients 16] [--seconds 15] [--rate 100]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _common import HOST, planted, post, quick_run, server

from rmbert.encoders.store import build_store
from rmbert.run import load_run


def drive(port: int, bodies: list[bytes], clients: int, seconds: float, rate: float | None = None) -> dict:
    """`clients` connections, each sending its next request when its last answer is in (closed
    loop, rate None: the most the server sustains) or at its slot of a fixed schedule (open loop:
    `rate` requests/s in all, latency counted from the slot, so a late server is not excused)."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t0 = time.perf_counter()
    stop = t0 + seconds

    def client(k: int) -> None:
        cn = http.client.HTTPConnection(HOST, port, timeout=30)
        i = 0
        while True:
            slot = t0 + (i * clients + k) / rate if rate else time.perf_counter()
            if slot >= stop:
                return
            time.sleep(max(0.0, slot - time.perf_counter()))
            try:
                post(cn, bodies[(i * clients + k) % len(bodies)])
                with lock:
                    lat.append(time.perf_counter() - slot)
            except Exception:
                with lock:
                    errors[0] += 1
                cn = http.client.HTTPConnection(HOST, port, timeout=30)
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "errors": errors[0],
        "req_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each of the two runs")
    ap.add_argument("--rate", type=float, default=100.0, help="offered load of the open-loop run (req/s)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench")
    ap.add_argument("--device", default="cpu", help="where the server scores (cpu or cuda)")
    a = ap.parse_args()
    data = planted(a.out, 2000)
    run_dir = quick_run(data, a.out / "serve-run", steps=30)
    store_dir = a.out / "serve-store"
    if not (store_dir / "meta.json").is_file():
        from rmbert.data.mind import load_news

        run = load_run(run_dir)
        news = load_news(data / "dev" / "news.tsv")
        build_store(store_dir, news.ids, news.title, run.encoding, progress=False)
        ids = news.ids
    else:
        ids = (store_dir / "seg-00000" / "ids.txt").read_text().split("\n")
    args = ["--device", a.device]
    with server(run_dir, store_dir, a.out / "serve-stderr.log", args) as port:
        rng = random.Random(0)
        bodies = [
            json.dumps(
                {"history": rng.sample(ids, 50), "candidates": rng.sample(ids, 100), "top_k": 10}
            ).encode()
            for _ in range(256)
        ]
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        for b in bodies[:5]:
            post(conn, b)  # warm-up
        single = [post(conn, bodies[i % len(bodies)]) for i in range(100)]
        closed = drive(port, bodies, a.clients, a.seconds)
        drive(port, bodies, a.clients, 2.0, rate=a.rate)  # settle
        opened = drive(port, bodies, a.clients, a.seconds, rate=a.rate)
        print(
            json.dumps(
                {
                    "device": a.device,
                    "candidates": 100,
                    "history": 50,
                    "single_client_p50_ms": round(statistics.median(single) * 1e3, 2),
                    "single_client_p99_ms": round(sorted(single)[98] * 1e3, 2),
                    "clients": a.clients,
                    **closed,
                    "at_rate": {"offered_req_per_s": a.rate, **opened},
                }
            )
        )


if __name__ == "__main__":
    main()
