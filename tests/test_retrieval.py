"""The retrieval stage: the ANN index over the live pool, kept consistent with the store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from rmbert.serve.retrieval import RetrievalConfig, Retriever, retrieval_vectors

pytest.importorskip("faiss")


def unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(vectors: np.ndarray, hist: np.ndarray, live: np.ndarray, queries: int, k: int) -> list[int]:
    """The retrieval answer by hand: per query (the clicks' normalised mean, then the clicks from
    the most recent) the rows by inner product; round-robin over the lists; clicks, dead rows and
    repeats skipped."""
    clicks = vectors[hist]
    mean = clicks.mean(0)
    lists = [mean / np.linalg.norm(mean), *clicks[-queries:][::-1]]
    ranked = [np.argsort(-(vectors[1:] @ q), kind="stable") + 1 for q in lists]
    want = min(k + len(hist), len(vectors) - 1)
    out: list[int] = []
    for rank in range(want):
        for r in ranked:
            row = int(r[rank])
            if live[row] and row not in hist and row not in out:
                out.append(row)
    return out[:k]


def test_exact_search_is_the_round_robin_of_the_per_query_rankings():
    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(300)])  # row 0: the null news
    live = np.ones(301, bool)
    live[[0, 5, 17, 40]] = False  # the null row and three replaced rows
    hist = np.array([3, 9, 120, 250])
    r = Retriever(vectors[1:], RetrievalConfig(top_n=25, queries=3))
    assert r.kind == "exact" and len(r) == 300
    got = r.search(vectors[hist], hist, live)
    assert got.tolist() == brute(vectors, hist, live, 3, 25)
    assert len(got) == 25 and not set(got) & {0, 5, 17, 40, *hist.tolist()}
    # a request's snapshot that has only rows < 200 never gets a newer row
    assert got.max() > 200 and r.search(vectors[hist], hist, live[:200]).max() < 200
    assert len(r.search(vectors[[]], np.zeros(0, np.int64), live)) == 0  # no clicks: no answer


def test_added_news_are_found_without_a_rebuild():
    vectors = unit(200, seed=1)
    r = Retriever(vectors, RetrievalConfig(top_n=5, queries=1))
    index_before = r.index
    new = unit(3, seed=2)
    r.add(new)  # rows 201..203
    assert r.index is index_before and len(r) == 203
    live = np.ones(204, bool)
    # a user whose one click equals news 202 gets it first (the click itself is row 7, excluded)
    clicks = new[1:2]
    assert r.search(clicks, np.array([7]), live)[0] == 202


def test_large_pools_use_an_inverted_file_with_high_recall_and_take_appends():
    cfg = RetrievalConfig(top_n=50, queries=2, exact_below=500, nprobe=16, train_sample=3000)
    # clustered vectors, as news are: 40 topics
    rng = np.random.default_rng(3)
    centers = unit(40, 32, seed=4)
    x = centers[rng.integers(0, 40, 3000)] + 0.1 * rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vectors = np.concatenate([np.zeros((1, 32), np.float32), x])
    live = np.ones(3001, bool)
    r = Retriever(vectors[1:], cfg)
    assert r.kind == "ivf-sq8"
    recalls = []
    for _ in range(20):
        hist = rng.choice(np.arange(1, 3001), 6, replace=False)
        exact = brute(vectors, hist, live, 2, 10)  # the exact top-10 of the same queries
        got = set(r.search(vectors[hist], hist, live).tolist())
        recalls.append(np.mean([row in got for row in exact]))
    assert np.mean(recalls) >= 0.9
    r.add(vectors[1:4])  # appended rows 3001..3003 (copies of rows 1..3): no retraining
    assert len(r) == 3003 and r.kind == "ivf-sq8"
    assert 3001 in r.search(vectors[[1]], np.array([1]), np.ones(3004, bool), k=5).tolist()


def test_an_exact_index_that_outgrows_its_limit_becomes_an_inverted_file():
    cfg = RetrievalConfig(top_n=5, exact_below=300, train_sample=600)
    r = Retriever(unit(200, seed=5), cfg)
    assert r.kind == "exact"
    r.add(unit(450, seed=6))
    assert r.kind == "ivf-sq8" and len(r) == 650


def test_retrieval_vectors_read_metric_head_zero_or_the_unit_news_vectors():
    cls = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    assert np.allclose(retrieval_vectors({"cls": cls}), [[0.6, 0.8], [0.0, 1.0]])
    sim = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # [N, h, D]
    assert np.array_equal(retrieval_vectors({"cls": cls, "sim": sim}, np.array([1])), sim[[1], 0])
    with pytest.raises(ValueError, match="retrieval.nprobe"):
        RetrievalConfig(nprobe=0)


def test_served_retrieval_follows_appends_updates_and_restarts(served, tmp_path, planted):
    """/rank without candidates re-ranks news retrieved from the whole live pool; a news posted
    to /news is retrievable at once; an updated news is served in its new version only; a
    restart over the same store gives the same answer."""
    from fastapi.testclient import TestClient

    from rmbert.data.mind import load_split
    from rmbert.serve.app import Limits, create_app

    store = tmp_path / "store"
    shutil.copytree(served / "store", store)
    dev = load_split(planted / "dev").news
    history = list(dev.ids[:4])
    limits = Limits(max_news_per_post=3, retrieve=8, store_poll_s=0)

    def rank(c):
        r = c.post("/rank", json={"history": history, "candidates": None, "top_k": 8})
        assert r.status_code == 200, r.text
        return r.json()

    with TestClient(create_app(served / "run", store, limits=limits)) as c:
        first = rank(c)
        assert first["candidates"] == 8 and not {x["id"] for x in first["ranked"]} & set(history)
        # a copy of the most recent click, posted now: it is as close to the user as news get
        j = dev.ids.index(history[-1])
        twin = {"id": "TWIN", "title": dev.title[j], "category": dev.category[j]}
        twin |= {"subcategory": dev.subcategory[j], "entities": dev.entities(j)}
        assert c.post("/news", json=[twin]).status_code == 200
        ranked = {x["id"] for x in rank(c)["ranked"]}
        assert "TWIN" in ranked
        # the update moves TWIN to a new row: the old row is never served again
        other = dev.ids.index(dev.ids[-1])
        changed = {**twin, "title": dev.title[other], "category": dev.category[other]}
        assert c.post("/news", json=[changed]).json()["updated"] == 1
        snap = c.app.state.serving.index.snapshot
        old_row = snap.index["TWIN"] - 1
        assert not snap.live[old_row] and snap.live[snap.index["TWIN"]]
        assert old_row not in snap.retrieve(np.array([snap.index[h] for h in history]), 50).tolist()
        after = rank(c)
    with TestClient(create_app(served / "run", store, limits=limits)) as c:  # a restart
        assert rank(c) == after
        snap = c.app.state.serving.index.snapshot
        assert len(snap.retriever) == snap.n - 1  # rebuilt from the store: every row, no more
