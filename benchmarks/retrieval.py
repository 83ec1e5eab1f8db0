"""The retrieval stage (serve/retrieval.py): speed at 10k-1M news, recall against exhaustive RMBERT.

Two parts, one JSON object on the last line:

- "pools": synthetic clustered unit vectors (D = 384; 2,000 topics), a random prior and
  synthetic categories and entities (`synthetic_fields`) at each pool size: index build time
  and memory, the field lists' build time, the cost of adding one news, the latency of one
  user's retrieval (50 clicks; both steps: gather, with the news sharing a field with the
  clicks, then shortlist 200 by the proxy), and the ANN's recall@200 (over the first 30 users): how much of the
  shortlist an exact index would give it holds.
- "recall": a trained run and a store of a split's news (planted data, or --run/--split): for
  each of the split's users, the exact top-10 of exhaustive scoring of the whole pool by the
  model's serving form, and how much of it the retrieval top-N holds (N = 50 ... 400); beside
  it the old behaviour (the 100 freshest news) and 200 random news. Then the two stages as
  served: p50/p99 of one /rank with `candidates: null` (retrieve 200, re-rank them), in process,
  and of its parts: the retrieval, the re-ranking of 200, and the model's side-path features of
  the proxy (`side_*`: over the first cut's news, or every gathered news without one).

- "http": p50/p99 of the same /rank requests over HTTP on 127.0.0.1, one at a time on a kept-alive
  connection, against `rmbert serve` in a subprocess with the same settings: what a client sees.
  The in-process figure above goes through Starlette's TestClient, whose transport alone costs
  about 3 ms a request (a GET /health: 2.9 ms through it, 0.8 ms over HTTP).

At 1M news the full service cannot be held on this machine (the serving index keeps title token
vectors, L x D per news), so "estimate_1m" starts from the served /rank over HTTP and swaps its
retrieval for the one at 1M: it takes off the served pool's retrieval timed as the synthetic
pools time theirs ("retrieve_plain_p50_ms": in process, without the model's side paths, so
without the first cut) and adds the synthetic retrieval at 1M. The side paths run on the first
cut, at most `first_cut` news at any pool size (eq. 8''''' on all of them, the rest on the
`second_cut`), and the re-ranking on 200, so the served request holds them as they would be at 1M. The synthetic users have 50 clicks, the served ones their
real histories (about 20 at the median), so the 1M retrieval is timed with more clicks than the
retrieval it replaces.
"sum_of_parts_ms" is the older estimate: the retrieval at 1M + the run's side-path cost per news
of the first cut times the news they would run on at 1M (min(gathered at 1M, first_cut): the
first and second cuts hold as many news there as on a served pool of 2,000 or more gathered) +
the re-ranking of 200;
it leaves out the request's own path (HTTP, parsing, the hand-off to the worker).

Usage: python benchmarks/retrieval.py [--sizes 10k,100k,1m] [--run RUN --split SPLIT] [--users 300]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _common import HOST, planted, post, quick_run, server

from rmbert.serve.retrieval import (
    Codes,
    FieldLists,
    Related,
    RetrievalConfig,
    Retriever,
    first_cut,
    gather,
    proxy_features,
    proxy_rows,
    quantize,
    retrieve,
    second_cut,
    sharing,
    take,
)

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
D = 384


def clustered(n: int, centers: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors [n, D] around random topic centres (cosine to the centre about 0.6), and
    their topics [n]."""
    topic = rng.integers(0, len(centers), n)
    x = centers[topic] + 0.066 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), topic


def synthetic_fields(topic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Match ids [n + 1, 5] (row 0 null) as MIND's are spread: a subcategory per topic among
    285, 16 subcategories to a category, and 0-3 title entities from a Zipf-like vocabulary of
    100,000 (about a third of titles name none)."""
    n = len(topic)
    sub = topic % 285 + 1
    ents = (rng.zipf(1.3, size=(n, 3)) % 100_000) + 1
    ents[rng.random((n, 3)) < np.array([0.33, 0.6, 0.85])] = 0
    out = np.concatenate([np.stack([(sub - 1) // 16 + 1, sub], 1), ents], 1)
    return np.concatenate([np.zeros((1, 5), np.int64), out])


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 3)


def pool_timing(n: int, users: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    topics = 2000
    centers = rng.standard_normal((topics, D)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x, topic = clustered(n, centers, rng)
    vectors = np.concatenate([np.zeros((1, D), np.float32), x])  # row 0: the null news
    del x
    by_topic = np.argsort(topic, kind="stable") + 1  # rows grouped by topic
    starts = np.searchsorted(topic[by_topic - 1], np.arange(topics + 1))
    live = np.ones(n + 1, bool)
    prior = (0.5 * rng.standard_normal(n + 1)).astype(np.float32)  # a candidate-only prior per news
    best = np.argsort(-prior[1:], kind="stable")[:712] + 1
    match = synthetic_fields(topic, rng)
    t0 = time.perf_counter()
    r = Retriever(
        vectors[1:], RetrievalConfig(weights=(3.8, 1.6, 0.5, 0.5))
    )  # about as calibrated on planted data
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    fields = FieldLists.build(match, live, prior, None, r.cfg.relist_after)
    lists = time.perf_counter() - t0
    subs = np.arange(286)  # the synthetic match keys of subcategories are their ids
    affinity = np.random.default_rng(seed + 1).standard_normal((286, 286))  # a learned one's cost
    related = Related.build(affinity, subs, ())
    exact = r
    if r.kind != "exact":
        exact = Retriever(vectors[1:], dataclasses.replace(r.cfg, exact_below=n + 1, flat_int8=False))

    def rows_of(rows: np.ndarray) -> np.ndarray:
        return take(vectors, rows)  # as the served snapshot copies them

    unit8 = quantize(vectors)  # the proxy's copy, as served (`proxy_arrays`)

    def unit(rows: np.ndarray) -> Codes:
        return proxy_rows(unit8, rows)

    lat, recall, gathered, shares = [], [], [], []
    for _ in range(users):
        hist = rng.integers(1, n + 1, 50)  # 14 clicks anywhere, 36 on the user's 3 topics
        for j, t in enumerate(rng.choice(topics, 3, replace=False)):
            if starts[t + 1] > starts[t]:
                hist[14 + 12 * j : 26 + 12 * j] = by_topic[rng.integers(starts[t], starts[t + 1], 12)]
        hist = np.array(list(dict.fromkeys(hist.tolist())), dtype=np.int64)
        t0 = time.perf_counter()
        shared = sharing(fields, match, live, hist, r.cfg, related)
        got = retrieve(r, rows_of, prior, best, hist, live, match=match, shared=shared, unit=unit)
        lat.append(time.perf_counter() - t0)
        shares.append(len(shared))
        if len(gathered) < 30:  # (outside the timing)
            gathered.append(len(gather(r, rows_of, best, hist, live, shared)))
        if exact is not r and len(recall) < 30:  # an exact search of 1M news is slow: 30 users
            want = retrieve(exact, rows_of, prior, best, hist, live, match=match, shared=shared, unit=unit)
            recall.append(len(np.intersect1d(got, want)) / max(1, len(want)))
    adds = []
    for i in range(200):
        one = vectors[1 + i : 2 + i]
        t0 = time.perf_counter()
        r.add(one)
        adds.append(time.perf_counter() - t0)
    return {
        "news": n,
        "index": r.kind,
        "build_s": round(build, 2),
        "field_lists_build_s": round(lists, 2),
        "field_gathered_mean": round(float(np.mean(shares)), 1),
        "gathered_mean": round(float(np.mean(gathered)), 1),
        "index_mib": round(r.memory_bytes() / 2**20, 1),
        "retrieve_p50_ms": pct(lat, 50),
        "retrieve_p99_ms": pct(lat, 99),
        "add_one_p50_ms": pct(adds, 50),
        "ann_recall_at_200": round(float(np.mean(recall)), 4) if recall else 1.0,
    }


def served_recall(
    run_dir: Path, store_dir: Path, split: Path, users: int, seed: int = 0, overrides: list[str] = ()
) -> dict:
    """Recall of the exhaustive top-10 by the retrieval top-N, and /rank latency, on a real run;
    `overrides`: `rmbert serve --set` ones (e.g. retrieval.readers=16)."""
    from fastapi.testclient import TestClient

    from rmbert.config import apply_overrides
    from rmbert.data.mind import load_split
    from rmbert.serve.app import Limits, create_app

    limits = apply_overrides(Limits(store_poll_s=0, max_history=500), ["retrieval.top_n=200", *overrides])
    out: dict = {}
    t0 = time.perf_counter()
    with TestClient(create_app(run_dir, store_dir, limits=limits)) as c:
        out["startup_s"] = round(time.perf_counter() - t0, 2)  # store, index, calibration, reader prior
        state = c.app.state.serving
        out["retrieval"] = {
            k: v for k, v in dataclasses.asdict(state.index.retrieval).items() if k != "weights"
        }
        snap, ranker = state.index.snapshot, state.ranker
        live_rows = np.flatnonzero(snap.live)
        dev = load_split(split)
        imps = dev.impressions
        rng = np.random.default_rng(seed)
        histories = []  # users with a click in the pool, in a random order
        for i in rng.permutation(len(imps)):
            ids = [dev.news.ids[r] for r in imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]]
            hist = [h for h in ids if h in snap.index]
            if hist:
                histories.append(hist)
            if len(histories) >= users:
                break

        def rows_of(hist: list[str]) -> np.ndarray:
            return np.array(list(dict.fromkeys(snap.index[h] for h in hist)), dtype=np.int64)

        # the latencies first, before the exhaustive scoring below fills the process's memory
        lat, rerank, retrieving, side, side_news, plain = [], [], [], [], [], []
        for hist in histories[:200]:
            t0 = time.perf_counter()
            r = c.post("/rank", json={"history": hist[-50:], "candidates": None, "top_k": 10})
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            hist_rows = rows_of(hist[-50:])
            cand, given = snap.retrieve_side(hist_rows)
            t0 = time.perf_counter()  # by the worker, as served (its threads; the proxy's side paths)
            ranker.score_queued(snap, hist_rows, cand, side=given)
            rerank.append(time.perf_counter() - t0)
        # the retrieval's parts apart from /rank (timed right after one, they ran beside the
        # threads it left spinning)
        for hist in histories[:200]:
            hist_rows = rows_of(hist[-50:])
            t0 = time.perf_counter()
            snap.retrieve(hist_rows)
            retrieving.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # without the side paths, as the synthetic pools time it
            retrieve(
                snap.retriever,
                snap.vectors,
                snap.arrays.get("prior"),
                snap.best_prior,
                hist_rows,
                snap.live,
                match=snap.arrays.get("match"),
                shared=snap.shared(hist_rows),
                unit=snap.unit,
            )
            plain.append(time.perf_counter() - t0)
            if snap.side is not None:  # the model's side-path features: for the first cut only
                cfg = snap.retriever.cfg
                g = snap.gather(hist_rows)
                p = snap.arrays["prior"][g]
                cheap = proxy_features(cfg, snap.unit, g, hist_rows, snap.arrays.get("match"))
                keep = first_cut(cfg, g, p, cheap, snap.side)
                kept, clicks = g[keep], hist_rows[-cfg.max_history :]
                t0 = time.perf_counter()  # as served: eq. 8''''' of the first cut, the rest of the second's
                second, given = second_cut(cfg, kept, p[keep], cheap[keep], snap.early, clicks)
                snap.side(kept[second], clicks, *([] if given is None else [given]))
                side.append(time.perf_counter() - t0)
                side_news.append(len(kept))
        out["bodies"] = [  # for the HTTP run (`http_rank`)
            json.dumps({"history": h[-50:], "candidates": None, "top_k": 10}) for h in histories[:200]
        ]
        out["rank_null_p50_ms"], out["rank_null_p99_ms"] = pct(lat, 50), pct(lat, 99)
        out["retrieve_p50_ms"], out["retrieve_p99_ms"] = pct(retrieving, 50), pct(retrieving, 99)
        out["rerank_200_p50_ms"], out["rerank_200_p99_ms"] = pct(rerank, 50), pct(rerank, 99)
        out["first_cut"] = snap.retriever.cfg.first_cut if snap.retriever.cfg.first_weights else 0
        out["second_cut"] = snap.retriever.cfg.second_cut if snap.retriever.cfg.second_weights else 0
        if side:  # per news: the side paths' cost at another pool size is this times its news
            out["side_p50_ms"], out["side_news_mean"] = pct(side, 50), round(float(np.mean(side_news)), 1)
            out["side_ms_per_1000_news"] = round(float(np.sum(side) / np.sum(side_news)) * 1e6, 3)
        out["retrieve_plain_p50_ms"] = pct(plain, 50)  # no side paths, no first cut

        Ns = (50, 100, 200, 400)
        hits = {n: [] for n in Ns}
        fresh, rand = [], []
        for hist in histories:
            hist_rows = rows_of(hist)
            pool = np.setdiff1d(live_rows, hist_rows)
            scores = ranker.score_rows(snap, hist_rows, pool)
            top10 = pool[np.argsort(-scores, kind="stable")[:10]]
            for n in Ns:
                got = snap.retrieve(hist_rows, n)
                hits[n].append(np.isin(top10, got).mean())
            recent = [r for r in snap.fresh if r not in set(hist_rows.tolist())][:100]
            fresh.append(np.isin(top10, recent).mean())
            rand.append(np.isin(top10, rng.choice(pool, 200, replace=False)).mean())
        out["pool_news"] = int(len(live_rows))
        out["users"] = len(histories)
        out["proxy_weights"] = list(snap.retriever.cfg.weights)
        out["recall_of_exact_top10"] = {f"retrieve_{n}": round(float(np.mean(hits[n])), 4) for n in Ns}
        out["recall_of_exact_top10"]["freshest_100"] = round(float(np.mean(fresh)), 4)
        out["recall_of_exact_top10"]["random_200"] = round(float(np.mean(rand)), 4)
    return out


def fresh(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh Python process (spawned), for timings that the memory an
    earlier part left behind does not slow."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args, **kwargs).result()


def http_rank(run_dir: Path, store_dir: Path, bodies: list[str], overrides: list[str], log: Path) -> dict:
    """p50/p99 of /rank over HTTP: `rmbert serve` in a subprocess with the settings of
    `served_recall` (`overrides`: its --set ones), each body sent twice, one at a time on a
    kept-alive connection (the first pass warms the server up, the second is timed)."""
    sets = ["store_poll_s=0", "max_history=500", "retrieval.top_n=200", *overrides]
    with server(run_dir, store_dir, log, [a for kv in sets for a in ("--set", kv)]) as port:
        with contextlib.closing(http.client.HTTPConnection(HOST, port, timeout=60)) as conn:
            for b in bodies:
                post(conn, b.encode())
            lat = [post(conn, b.encode()) for b in bodies]
    return {"rank_null_p50_ms": pct(lat, 50), "rank_null_p99_ms": pct(lat, 99), "requests": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10k,100k,1m", help='synthetic pools to time ("" for none)')
    ap.add_argument("--run", type=Path, default=None, help="a trained run (default: train a short one)")
    ap.add_argument("--split", type=Path, default=None, help="a split: its news are the pool, its users ask")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--readers", type=int, default=None, help="rmbert serve --readers (default 4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as rmbert serve --set")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench")
    a = ap.parse_args()
    from rmbert.data.mind import load_news
    from rmbert.encoders.store import build_store
    from rmbert.run import load_run

    if a.run is None:
        data = planted(a.out, 2000)
        run_dir = quick_run(data, a.out / "retrieval-run", steps=300)
        split = data / "dev"
    else:
        run_dir, split = a.run, a.split
    news_file = split / "news.tsv"
    store_dir = a.out / f"retrieval-store-{run_dir.name}-{split.parent.name}"
    if not (store_dir / "meta.json").is_file():
        news = load_news(news_file)
        info = [
            {"category": news.category[i], "subcategory": news.subcategory[i], "entities": news.entities(i)}
            for i in range(len(news))
        ]
        build_store(store_dir, news.ids, news.title, load_run(run_dir).encoding, info=info, progress=False)
    overrides = ([] if a.readers is None else [f"retrieval.readers={a.readers}"]) + a.set
    result: dict = {"pools": []}
    sizes = [SIZES[size] for size in filter(None, a.sizes.split(","))]
    # each part in a fresh process: after a 34k-news service held in memory the same process
    # timed everything about 1.5 times slower, the index build too (1M: 24 -> 40 ms), and the
    # served parts after the 1M pool up to 1.5 times slower than in a server of their own
    for n in sizes:
        result["pools"].append(fresh(pool_timing, n))
        print(json.dumps(result["pools"][-1]), file=sys.stderr, flush=True)
    served = fresh(served_recall, run_dir, store_dir, split, a.users, overrides=overrides)
    bodies = served.pop("bodies")
    result["recall"] = served
    served["http"] = http_rank(run_dir, store_dir, bodies, overrides, a.out / "retrieval-serve.log")
    print(json.dumps(served["http"]), file=sys.stderr, flush=True)
    if 1_000_000 in sizes:
        big = result["pools"][sizes.index(1_000_000)]
        G = big["gathered_mean"]
        side_news = min(G, served["first_cut"] or G)  # the model's side paths: over the first cut
        side_ms = served.get("side_ms_per_1000_news", 0.0) * side_news / 1000
        swapped = big["retrieve_p50_ms"] - served["retrieve_plain_p50_ms"]
        result["estimate_1m"] = {
            "rank_null_p50_ms": round(served["http"]["rank_null_p50_ms"] + swapped, 2),
            "parts": "served /rank p50 over HTTP - retrieve_plain_p50 + retrieve_p50 at 1m",
            "retrieval_swapped_ms": round(swapped, 2),
            "sum_of_parts_ms": round(big["retrieve_p50_ms"] + side_ms + served["rerank_200_p50_ms"], 2),
            "side_ms": round(side_ms, 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
