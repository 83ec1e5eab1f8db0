"""The HTTP service on a tiny random model: ranking, explanations, fresh news, bad input, durability."""

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from rmbert.cli import main
from rmbert.config import RunConfig
from rmbert.data.mind import load_split
from rmbert.encoders.store import NewsStore
from rmbert.evaluate import score_impressions
from rmbert.run import load_run
from rmbert.serve.app import create_app
from rmbert.train import train


def test_rank_equals_evaluate(client, served, planted):
    split = load_split(planted / "dev")
    imps = split.impressions
    run = load_run(served / "run")
    batcher = run.batcher(split, run.store([split], progress=False))
    scores = score_impressions(run.model, batcher)
    for i in range(5):
        hist = [split.news.ids[j] for j in imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]]
        cands = [split.news.ids[j] for j in imps.cand[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]]
        r = client.post("/rank", json={"history": hist, "candidates": cands, "top_k": 100})
        assert r.status_code == 200, r.text
        got = {x["id"]: x["score"] for x in r.json()["ranked"]}
        want = dict(zip(cands, scores[imps.cand_ptr[i] : imps.cand_ptr[i + 1]].tolist()))
        assert got.keys() == want.keys()
        assert np.allclose([got[k] for k in cands], [want[k] for k in cands], rtol=0, atol=1e-5)
        ranked = [x["score"] for x in r.json()["ranked"]]
        assert ranked == sorted(ranked, reverse=True)


def test_split_terms_score_as_the_model_does(served, planted, monkeypatch):
    """Evaluation through the folded form, each candidate news's terms computed once for the
    split, gives the model's own forward scores; candidates missing from news.tsv (row 0)
    included. Serving's equality above checks the folded form against itself."""
    split = load_split(planted / "dev")
    run = load_run(served / "run")
    batcher = run.batcher(split, run.store([split], progress=False))
    batcher.cand_rows[3] = 0  # a candidate missing from news.tsv scores as the empty news
    form = run.model.rec.scoring_form()
    assert form is not None and not form.candidate_tokens
    folded = score_impressions(run.model, batcher, batch_size=5)
    monkeypatch.setattr(type(run.model.rec), "scoring_form", lambda self: None)
    direct = score_impressions(run.model, batcher, batch_size=5)
    assert np.allclose(folded, direct, rtol=0, atol=1e-4)
    assert folded.std() > 0.01  # scores that differ, so that the equality says something
    # chunks of 3 news give the same terms; the title weights, read only when recording, are not kept
    rows = np.unique(batcher.cand_rows)
    whole, chunked = (run.model.split_terms(form, rows, chunk=n) for n in (len(rows), 3))
    assert whole.keys() == chunked.keys() and {"left", "right", "cls"} <= whole.keys()
    assert "title" not in whole and form.record_terms == ("title",)
    assert all(torch.allclose(whole[k], chunked[k], atol=1e-6) for k in whole)


def test_rank_makes_no_thread_pool_hop(client, planted, monkeypatch):
    """/rank runs on the event loop and hands the scoring to the worker: a plain `def` dependency
    or handler on its path would go through FastAPI's thread pool (one hop per request)."""
    import fastapi.dependencies.utils as deps
    import fastapi.routing as routing

    def refuse(*args, **kwargs):
        raise AssertionError("a thread-pool hop on the /rank path")

    monkeypatch.setattr(deps, "run_in_threadpool", refuse)
    monkeypatch.setattr(routing, "run_in_threadpool", refuse)
    ids = load_split(planted / "dev").news.ids
    r = client.post("/rank", json={"history": ids[:3], "candidates": ids[5:9], "top_k": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["ranked"]) == 2


def test_explain_gives_each_step(client, planted):
    split = load_split(planted / "dev")
    hist = split.news.ids[:4]
    cands = split.news.ids[10:16]
    r = client.post("/rank", json={"history": hist, "candidates": cands, "top_k": 2, "explain": True})
    body = r.json()
    assert r.status_code == 200 and len(body["ranked"]) == 2
    for item in body["ranked"]:
        steps = item["steps"]
        assert len(steps) == 3
        title_words = item["title"].lower().split()
        for s in steps:
            assert [h["id"] for h in s["history"]] == hist
            assert sum(h["weight"] for h in s["history"]) == pytest.approx(1.0, abs=1e-5)
            assert [w["word"] for w in s["title"]] == title_words
            assert sum(w["weight"] for w in s["title"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_is_never_a_500(client, planted):
    ids = load_split(planted / "dev").news.ids
    r = client.post("/rank", json={"history": ["NOPE", ids[0]], "candidates": [ids[1], "ALSO"]})
    assert r.status_code == 404 and r.json()["detail"]["unknown_ids"] == ["NOPE", "ALSO"]
    assert client.post("/rank", json={"history": ids[:61], "candidates": ids[:2]}).status_code == 413
    assert client.post("/rank", json={"history": [], "candidates": ids[:31]}).status_code == 413
    assert (
        client.post("/rank", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.post("/rank", json={"history": "N1", "candidates": [1, 2]}).status_code == 422
    assert client.post("/rank", json={"history": [], "candidates": ids[:2], "top_k": 0}).status_code == 422
    r = client.post("/rank", json={"history": [], "candidates": ids[:3]})
    assert r.status_code == 200 and r.json()["history_used"] == 0 and "prior" in r.json()["note"]
    r = client.post(
        "/rank", json={"history": [ids[0], ids[0]], "candidates": [ids[1], ids[1], ids[2]], "top_k": 9}
    )
    assert r.status_code == 200 and r.json()["duplicates_dropped"] == 1 and len(r.json()["ranked"]) == 2
    assert client.post("/news", json={"news": [{"id": "X 1", "title": "t"}]}).status_code == 422
    assert client.post("/news", json={"news": [{"id": "X1", "title": ""}]}).status_code == 422
    too_many = [{"id": f"Z{i}", "title": "storm"} for i in range(4)]
    assert client.post("/news", json=too_many).status_code == 413
    m = client.get("/metrics").text
    assert 'rmbert_requests_total{path="/rank",status="404"} 1' in m
    assert 'rmbert_errors_total{path="/rank",status="413"} 2' in m
    assert "rmbert_request_seconds_bucket" in m and "rmbert_store_news" in m


def test_fresh_news_rank_at_once_and_persist(client):
    before = client.get("/health").json()["news"]
    r = client.post(
        "/news",
        json={
            "news": [
                {"id": "FRESH1", "title": "hurricane storm flooding coast", "category": "weather"},
                {"id": "FRESH2", "title": "quarterback touchdown playoffs"},
            ]
        },
    )
    assert r.status_code == 200 and r.json() == {"added": 2, "updated": 0, "store_size": before + 2}
    r = client.post("/rank", json={"history": ["FRESH2"], "candidates": None, "top_k": 10})
    ids = [x["id"] for x in r.json()["ranked"]]
    assert ids and "FRESH1" in ids and "FRESH2" not in ids  # freshest first, history excluded
    assert len(ids) == 5
    # an update replaces the title; the store on disk has both changes after a reopen
    r = client.post("/news", json=[{"id": "FRESH1", "title": "blizzard snow freezing"}])
    assert r.json()["updated"] == 1
    got = client.get("/news", params={"ids": "FRESH1,FRESH2"}).json()
    assert got[0]["title"] == "blizzard snow freezing" and got[1]["title"] == "quarterback touchdown playoffs"
    store = NewsStore.open(client.store_path)
    assert store.info[store.index["FRESH1"] - 1]["title"] == "blizzard snow freezing"
    assert len(store.live_ids) == before + 2


def test_concurrent_news_and_rank_stay_consistent(client, planted):
    ids = load_split(planted / "dev").news.ids
    errors = []

    def adder(k):
        for j in range(3):
            r = client.post("/news", json=[{"id": f"C{k}_{j}", "title": "snow storm"}])
            if r.status_code != 200:
                errors.append(r.text)

    def ranker():
        for _ in range(8):
            r = client.post("/rank", json={"history": ids[:5], "candidates": None, "top_k": 5})
            if r.status_code != 200 or len(r.json()["ranked"]) != 5:
                errors.append(r.text)

    threads = [threading.Thread(target=adder, args=(k,)) for k in range(3)] + [
        threading.Thread(target=ranker) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = client.get(
        "/news", params={"ids": ",".join(f"C{k}_{j}" for k in range(3) for j in range(3))}
    ).json()
    assert len(got) == 9


def test_page_and_users(client):
    r = client.get("/")
    assert r.status_code == 200 and "heat-history" in r.text and "/rank" in r.text
    users = client.get("/users").json()
    assert users and {"user", "history", "candidates"} <= set(users[0])


def test_batched_requests_score_as_single_ones(client, planted):
    """The worker pads concurrent requests into one batch; each still gets its own scores."""
    ids = load_split(planted / "dev").news.ids
    rng = np.random.default_rng(0)
    bodies = [
        {
            "history": list(rng.choice(ids, k, replace=False)),
            "candidates": list(rng.choice(ids, c, replace=False)),
            "top_k": 50,
        }
        for k, c in [(0, 3), (7, 12), (30, 5), (2, 20)]
    ]
    single = [client.post("/rank", json=b).json()["ranked"] for b in bodies]
    results: list = [None] * len(bodies)

    def go(i):
        results[i] = client.post("/rank", json=bodies[i]).json()["ranked"]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, r in zip(single, results):
        assert [x["id"] for x in s] == [x["id"] for x in r]
        assert np.allclose([x["score"] for x in s], [x["score"] for x in r], atol=1e-5)


def test_one_padded_batch_scores_each_request_as_alone(served):
    """The worker's padding (history, candidates, title length) never changes a request's scores."""
    from rmbert.serve.index import ServingIndex
    from rmbert.serve.ranker import Job, Ranker

    ranker = Ranker(load_run(served / "run"))
    try:
        snap = ServingIndex(NewsStore.open(served / "store"), ranker.prepare).snapshot
        rng = np.random.default_rng(1)
        rows = np.arange(1, snap.n)
        jobs = [
            Job(snap, rng.choice(rows, m, replace=False), rng.choice(rows, c, replace=False), 100, e, None)
            for m, c in [(0, 4), (9, 1), (40, 17), (3, 8)]
            for e in (False, True)
        ]
        together = ranker._score(jobs)
        for job, got in zip(jobs, together):
            alone = ranker._score([job])[0]
            assert np.allclose(got.scores, alone.scores, rtol=0, atol=1e-5)
            a, b = json.loads(got.ranked_json), json.loads(alone.ranked_json)
            assert [x["id"] for x in a] == [x["id"] for x in b] and len(a) == len(job.cand_rows)
            assert ("steps" in a[0]) == job.explain
            for x, y in zip(a, b) if job.explain else ():
                for s, t in zip(x["steps"], y["steps"]):
                    assert [w["word"] for w in s["title"]] == [w["word"] for w in t["title"]]
                    assert np.allclose(
                        [w["weight"] for w in s["title"]], [w["weight"] for w in t["title"]], atol=1e-6
                    )
                    assert len(s["history"]) == len(job.hist_rows)
                    assert np.allclose(
                        [h["weight"] for h in s["history"]], [h["weight"] for h in t["history"]], atol=1e-6
                    )
    finally:
        ranker.close()


def test_click_terms_from_the_index_score_as_computed(served):
    """`Limits.click_terms`: the clicks' products gathered from the serving index, shifted by their
    recency embeddings', score as the folded form computing them from the clicks, in a padded
    batch too; the index holds them for every news."""
    from rmbert.serve.index import ServingIndex
    from rmbert.serve.ranker import Job, Ranker

    run = load_run(served / "run")
    assert run.model.features.pos is not None and run.cfg.rmbert.similarity  # both terms are read
    held, computed = Ranker(run), Ranker(run, click_terms=False)
    try:
        snap = ServingIndex(NewsStore.open(served / "store"), held.prepare).snapshot
        plain = ServingIndex(NewsStore.open(served / "store"), computed.prepare).snapshot
        assert "click_map" not in plain.arrays
        assert snap.arrays["click_map"].shape[0] == snap.arrays["cls"].shape[0] == snap.n
        assert snap.arrays["click_scale"].shape == (snap.n, run.cfg.rmbert.similarity_heads)
        rng = np.random.default_rng(2)
        rows = np.arange(1, snap.n)
        jobs = [
            (rng.choice(rows, m, replace=False), rng.choice(rows, c, replace=False))
            for m, c in [(1, 5), (12, 9), (40, 3)]
        ]
        got = held._score([Job(snap, h, c, 100, False, None) for h, c in jobs])
        want = computed._score([Job(plain, h, c, 100, False, None) for h, c in jobs])
        for g, w in zip(got, want):
            assert np.allclose(g.scores, w.scores, rtol=0, atol=1e-5)
        # the retrieval's side-path features for one job of a batch: the other's computed, both
        # as alone (the heads' columns first, which the re-ranker skips)
        (h0, c0), (h1, c1) = jobs[1], jobs[2]
        side = held.content_proxy()(snap.arrays, c0, h0)
        assert side.shape == (len(c0), held.proxy_heads + 10) and held.proxy_heads == 2
        mixed = held._score(
            [Job(snap, h0, c0, 100, False, None, side=side), Job(snap, h1, c1, 100, False, None)]
        )
        given = held._score([Job(snap, h0, c0, 100, False, None, side=side)])[0]
        for g, w in zip([*mixed, given], [want[1], want[2], want[1]]):
            assert np.allclose(g.scores, w.scores, rtol=0, atol=1e-5)
        hist, cand = jobs[1]
        snap.arrays["click_map"][hist] += 1.0  # (the tensors view these arrays) read, not recomputed
        moved = held._score([Job(snap, hist, cand, 100, False, None)])[0].scores
        assert np.abs(moved - got[1].scores).max() > 1e-3
    finally:
        held.close()
        computed.close()


def test_a_baseline_serves_what_it_evaluates(tiny_encoder, planted, tmp_path):
    """NRMS over the same store, without standardisation: the generic (unfolded) scoring path."""
    cfg = RunConfig()
    cfg = dataclasses.replace(
        cfg,
        model="nrms",
        encoder=dataclasses.replace(cfg.encoder, name=str(tiny_encoder), max_title_len=12),
        train=dataclasses.replace(cfg.train, epochs=1, batch_size=8, checkpoint_every=0, max_steps=5),
    )
    train(cfg, planted / "train", tmp_path / "run", planted / "dev", progress=False)
    news = str(planted / "dev" / "news.tsv")
    assert (
        main(["--quiet", "encode", str(tmp_path / "run"), "--news", news, "--out", str(tmp_path / "s")]) == 0
    )
    split = load_split(planted / "dev")
    imps = split.impressions
    run = load_run(tmp_path / "run")
    scores = score_impressions(run.model, run.batcher(split, run.store([split], progress=False)))
    with TestClient(create_app(tmp_path / "run", tmp_path / "s")) as c:
        for i in range(3):
            hist = [split.news.ids[j] for j in imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]]
            cands = [split.news.ids[j] for j in imps.cand[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]]
            r = c.post("/rank", json={"history": hist, "candidates": cands, "top_k": 100})
            got = {x["id"]: x["score"] for x in r.json()["ranked"]}
            want = scores[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
            assert np.allclose([got[k] for k in cands], want, rtol=0, atol=1e-5)


def test_diversity_reranks_the_top_k_by_mmr(served, client, planted):
    """`diversity` re-orders the returned top_k by MMR over the serving vectors; 0 is the plain
    order, the scores are the model's either way, and values outside [0, 1] are refused."""
    from rmbert.beyond import mmr_order
    from rmbert.serve.index import ServingIndex
    from rmbert.serve.ranker import Job, Ranker

    ranker = Ranker(load_run(served / "run"))
    try:
        snap = ServingIndex(NewsStore.open(served / "store"), ranker.prepare).snapshot
        rng = np.random.default_rng(3)
        hist, cands = rng.choice(np.arange(1, snap.n), 6, replace=False), np.arange(1, min(snap.n, 25))
        x = torch.nn.functional.normalize(
            snap.tensors["cls"][torch.from_numpy(cands)].float(), dim=-1
        ).numpy()
        plain = ranker._score([Job(snap, hist, cands, 8, False, None)])[0]
        orders = {}
        for d in (0.0, 0.5, 1.0):
            got = ranker._score([Job(snap, hist, cands, 8, False, None, d)])[0]
            assert np.allclose(got.scores, plain.scores, atol=1e-6)
            assert got.order.tolist() == mmr_order(plain.scores, x, 8, d).tolist()
            orders[d] = got.order.tolist()
        assert orders[0.0] == np.argsort(-plain.scores, kind="stable")[:8].tolist()
        assert orders[1.0] != orders[0.0] and orders[1.0][0] == orders[0.0][0]
    finally:
        ranker.close()
    ids = load_split(planted / "dev").news.ids
    body = {"history": ids[:3], "candidates": ids[5:15], "top_k": 5}
    assert client.post("/rank", json={**body, "diversity": 1.5}).status_code == 422
    r = client.post("/rank", json={**body, "diversity": 0.7})
    assert r.status_code == 200 and len(r.json()["ranked"]) == 5


def test_evaluate_diversity_ranks_over_the_serving_vectors(served, planted, capsys):
    """`rmbert evaluate --diversity` re-ranks over the vectors serving ranks over (pooled,
    standardised, with features), and at 0 it is plain evaluate."""
    from rmbert.serve.index import ServingIndex
    from rmbert.serve.ranker import Ranker

    run = load_run(served / "run")
    ranker = Ranker(run)
    try:
        snap = ServingIndex(NewsStore.open(served / "store"), ranker.prepare).snapshot
    finally:
        ranker.close()
    split = load_split(planted / "dev")
    store = run.store([split], progress=False)
    run.batcher(split, store)  # attaches the store and the feature tables, as evaluate does
    ids = [i for i in split.news.ids if i in snap.index]
    assert len(ids) > 10
    got = run.model.candidate_vectors(torch.as_tensor(store.rows(ids))).numpy()
    want = snap.tensors["cls"][[snap.index[i] for i in ids]].numpy()
    assert np.allclose(got, want, atol=1e-5)
    out = {}
    for d in ("0", "0.5"):
        args = ["evaluate", str(served / "run"), "--split", str(planted / "dev"), "--quiet", "--diversity", d]
        assert main(args) == 0
        out[d] = json.loads(capsys.readouterr().out)
    assert out["0.5"]["auc"] != out["0"]["auc"]
    with pytest.raises(SystemExit):
        main(["evaluate", str(served / "run"), "--split", str(planted / "dev"), "--diversity", "1.5"])
