"""One-news appends into a 50k-news store: time and extra resident memory per append.

The store has MiniLM's shape (D = 384, L = 30, fp16), encoded by a one-layer random BERT of that
width so that building it is quick; an append's cost does not depend on the encoder's depth
beyond encoding its one title. Targets (issue 11): under 100 ms and under 50 MB extra RSS.
Prints one JSON object (last line). Usage: python benchmarks/append.py [--news 50000] [--appends 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rmbert.data.words import FILLERS, TOPICS
from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer, save_tiny_encoder
from rmbert.encoders.store import Encoding, NewsStore, build_store


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--news", type=int, default=50_000)
    ap.add_argument("--appends", type=int, default=20)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    a = ap.parse_args()
    root = a.dir or Path(tempfile.mkdtemp(prefix="rmbert-append-"))
    words = [w for subs in TOPICS.values() for ws in subs.values() for w in ws] + FILLERS
    enc_dir = save_tiny_encoder(root / "encoder", words, hidden=384, layers=1)
    enc = BertNewsEncoder.from_pretrained(str(enc_dir), max_title_len=30)
    tok = load_tokenizer(str(enc_dir))
    encoding = Encoding.of(enc, tok)
    rng = np.random.default_rng(0)
    titles = [" ".join(rng.choice(words, int(rng.integers(6, 14)))) for _ in range(a.news)]
    t0 = time.perf_counter()
    store_dir = root / "store"
    if not (store_dir / "meta.json").is_file():
        build_store(store_dir, [f"N{i}" for i in range(a.news)], titles, encoding, progress=False)
    build_s = time.perf_counter() - t0
    store = NewsStore.open(store_dir)
    enc.eval()
    store = store.append(["WARM"], ["storm snow"], encoding)  # first call: thread pools, tokenizer
    times, rss = [], []
    base = rss_mb()
    for k in range(a.appends):
        t = time.perf_counter()
        store = store.append([f"A{k}"], [titles[k]], encoding)
        times.append((time.perf_counter() - t) * 1e3)
        rss.append(rss_mb() - base)
    reopen_t = time.perf_counter()
    reopened = NewsStore.open(store_dir)
    reopen_ms = (time.perf_counter() - reopen_t) * 1e3
    out = {
        "store_news": a.news,
        "segments_after": len(reopened.segments),
        "store_bytes": sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()),
        "build_s": round(build_s, 1),
        "append_ms_median": round(float(np.median(times)), 2),
        "append_ms_max": round(float(np.max(times)), 2),
        "extra_rss_mb_after_all": round(rss[-1], 1),
        "extra_rss_mb_per_append": round(rss[-1] / a.appends, 2),
        "open_ms_with_all_segments": round(reopen_ms, 1),
        "targets": {"append_ms": 100, "extra_rss_mb": 50},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
