"""The retrieval stage: the ANN index over the live pool, kept consistent with the store."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from rmbert.models.rmbert import RMBERT, slots_in_use
from rmbert.serve.retrieval import (
    Codes,
    ExactIndex,
    RetrievalConfig,
    Retriever,
    calibration_set,
    cosine_features,
    first_cut,
    head_cosines,
    interests,
    key_positions,
    least_squares,
    match_features,
    pair_cosines,
    proxy_rows,
    quantize,
    retrieval_vectors,
    second_cut,
    second_cut_keeps,
    shortlist,
    union,
)

pytest.importorskip("faiss")


def unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(
    vectors: np.ndarray, hist: np.ndarray, live: np.ndarray, queries: int, per_query: int, searched=None
) -> list[int]:
    """Step 1 by hand: per query (the clicks' normalised mean, then the clicks from the most
    recent, or `searched` in their place) the rows by inner product, of which the first
    per_query live non-clicks count; merged rank by rank over the queries, repeats dropped."""
    clicks = vectors[hist]
    mean = clicks.mean(0)
    lists = [mean / np.linalg.norm(mean), *(clicks[-queries:][::-1] if searched is None else searched)]
    ranked = [np.argsort(-(vectors[1:] @ q), kind="stable") + 1 for q in lists]
    want = min(per_query + len(hist), len(vectors) - 1)
    out: list[int] = []
    taken = [0] * len(lists)
    for rank in range(want):
        for q, r in enumerate(ranked):
            row = int(r[rank])
            if live[row] and row not in hist and taken[q] < per_query:
                taken[q] += 1
                if row not in out:
                    out.append(row)
    return out


def test_gathering_is_the_round_robin_of_each_querys_nearest():
    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(300)])  # row 0: the null news
    live = np.ones(301, bool)
    live[[0, 5, 17, 40]] = False  # the null row and three replaced rows
    hist = np.array([3, 9, 120, 250])
    r = Retriever(vectors[1:], RetrievalConfig(queries=3, per_query=25, flat_int8=False))
    assert r.kind == "exact" and len(r) == 300
    got = r.nearest(vectors[hist], hist, live)
    assert got.tolist() == brute(vectors, hist, live, 3, 25)
    assert 25 < len(got) <= 100 and not set(got) & {0, 5, 17, 40, *hist.tolist()}
    # a request's snapshot that has only rows < 200 never gets a newer row
    assert got.max() > 200 and r.nearest(vectors[hist], hist, live[:200]).max() < 200
    assert len(r.nearest(vectors[[]], np.zeros(0, np.int64), live)) == 0  # no clicks: nothing


def test_interests_are_the_centroids_of_the_clicks_clusters():
    """`interests`: clicks around 3 directions (most recent first) give 3 unit centroids, one
    per direction, the most recent click's first; fewer clicks than k are searched as they are;
    `nearest` with interests searches the mean and the centroids instead of each click."""
    centres = unit(3, seed=1)
    rng = np.random.default_rng(2)
    which = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1])
    clicks = centres[which] + 0.1 * rng.standard_normal((12, 16)).astype(np.float32)
    clicks /= np.linalg.norm(clicks, axis=1, keepdims=True)
    got = interests(clicks, 3)
    assert got.shape == (3, 16) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for c, w in zip(got, (2, 0, 1)):  # seeded from the most recent click, farthest first
        members = clicks[which == w].sum(0)
        assert np.allclose(c, members / np.linalg.norm(members), atol=1e-5)
    assert interests(clicks[:2], 3) is not None and np.array_equal(interests(clicks[:2], 3), clicks[:2])
    assert len(interests(np.repeat(clicks[:1], 5, 0), 3)) == 1  # one direction: the emptied ones dropped

    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(300)])
    live = np.ones(301, bool)
    live[0] = False
    hist = np.array([3, 9, 120, 250, 17])
    r = Retriever(vectors[1:], RetrievalConfig(interests=2, per_query=25, flat_int8=False))
    got = r.nearest(vectors[hist], hist, live)
    assert got.tolist() == brute(vectors, hist, live, 50, 25, interests(vectors[hist][::-1], 2))


def test_the_shortlist_ranks_by_the_proxy_and_calibration_recovers_its_weights():
    cand, clicks = unit(40, seed=7), unit(6, seed=8)
    f = cosine_features(cand, clicks, recent=2)
    cos = cand @ clicks.T
    want = np.stack([cos.max(1), cos.mean(1), cos[:, 4:].max(1), cos[:, 4:].mean(1)], 1)
    assert np.allclose(f, want, atol=1e-6)  # torch and numpy sum in different orders
    rows, prior = np.arange(100, 140), np.linspace(0, 1, 40)
    w = (2.0, -0.5, 1.0, 0.25)
    best = rows[np.argsort(-(prior + 2.0 * f[:, 0] - 0.5 * f[:, 1] + f[:, 2] + 0.25 * f[:, 3]))[:7]]
    assert shortlist(rows, prior, f, w, 7).tolist() == best.tolist()
    # a model whose score is prior + 2 max + 0.5 mean + 1.5 recent max + 3: calibration finds it
    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(400, seed=9)])
    prior_all = np.random.default_rng(10).standard_normal(401)

    def score(hist, cand):
        g = cosine_features(vectors[cand], vectors[hist], recent=3)
        return prior_all[cand] + 2.0 * g[:, 0] + 0.5 * g[:, 1] + 1.5 * g[:, 2] + 3.0

    X, y = calibration_set(vectors, prior_all, np.arange(1, 401), score, users=6, recent=3)
    got = least_squares(X, y)
    assert np.allclose(got, (2.0, 0.5, 1.5, 0.0), atol=1e-5)
    # the vectors read by row (serving: the pool is never copied whole), a few rows at a time
    by_row = calibration_set(
        lambda r: vectors[r], prior_all, np.arange(1, 401), score, users=6, recent=3, chunk=7
    )
    assert least_squares(*by_row) == got
    # the first cut's proxy: the fit on the leading columns alone (and the constant)
    lead = np.linalg.lstsq(X[:, [0, 1, 4]], y, rcond=None)[0][:2]
    assert np.allclose(least_squares(X, y, 2), lead) and len(least_squares(X, y, 2)) == 2
    # the second cut's: the columns listed (and the constant)
    picked = np.linalg.lstsq(X[:, [0, 2, 4]], y, rcond=None)[0][:2]
    assert np.allclose(least_squares(X, y, [0, 2]), picked) and len(least_squares(X, y, [0, 2])) == 2
    assert not np.allclose(picked, lead)
    assert least_squares(X[:0], y[:0]) == RetrievalConfig.weights  # nothing to fit: the defaults


def test_the_proxy_reads_the_match_features_of_a_feature_match_model():
    """With match ids (rmbert.feature_match) the proxy has the six feature-match features after the four
    cosines; a w of four weighs them 0; calibration finds their weights too."""
    rng = np.random.default_rng(11)
    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(400, seed=12)])
    match = rng.integers(0, 4, (401, 5))
    match[0] = 0
    cand, hist = np.arange(1, 41), np.arange(41, 47)
    f = cosine_features(vectors[cand], vectors[hist], 2, match[cand], match[hist])
    assert f.shape == (40, 10) and np.allclose(f[:, :4], cosine_features(vectors[cand], vectors[hist], 2))
    want = RMBERT.match_features(
        torch.from_numpy(match[cand])[None],
        torch.from_numpy(match[hist])[None],
        torch.ones(1, 6, dtype=torch.bool),
    )[0]
    assert np.allclose(f[:, 4:], want.numpy())
    prior = np.zeros(40)
    assert (
        shortlist(cand, prior, f, (1.0, 0.0, 0.0, 0.0), 5).tolist() == cand[np.argsort(-f[:, 0])[:5]].tolist()
    )
    prior_all = rng.standard_normal(401)

    def score(h, c):
        g = cosine_features(vectors[c], vectors[h], 5, match[c], match[h])
        return prior_all[c] + 2.0 * g[:, 0] + 0.7 * g[:, 4] - 0.4 * g[:, 9] + 1.0

    got = least_squares(*calibration_set(vectors, prior_all, np.arange(1, 401), score, users=6, match=match))
    assert len(got) == 10 and np.allclose(got, (2.0, 0, 0, 0, 0.7, 0, 0, 0, 0, -0.4), atol=1e-5)


def test_calibration_on_the_gathered_news_fits_what_the_shortlist_ranks():
    """With a gather step, each pseudo-user's candidates are exactly the news gathered for it
    (the shortlist's input), its clicks half within 1-3 subcategories and half anywhere, and
    the weights of a model linear in the features are recovered."""
    rng = np.random.default_rng(21)
    vectors = np.concatenate([np.zeros((1, 16), np.float32), unit(600, seed=22)])
    match = np.concatenate([np.zeros((1, 5), np.int64), rng.integers(0, 400, (600, 5))])
    match[1:, 1] = rng.integers(1, 31, 600)  # 30 subcategories of about 20 news
    match[1:, 0] = (match[1:, 1] - 1) // 3 + 1  # 10 categories
    live_rows = np.arange(1, 601)
    prior_all = rng.standard_normal(601)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def gather(hist):  # any rule will do: the 150 news nearest the clicks' mean, clicks left out
        mean = vectors[hist].mean(0)
        rest = np.setdiff1d(live_rows, hist)
        return np.sort(rest[np.argsort(-(vectors[rest] @ mean))[:150]])

    def score(h, c):
        seen.append((h, c))
        g = cosine_features(vectors[c], vectors[h], 5, match[c], match[h])
        return prior_all[c] + 1.5 * g[:, 1] - 0.5 * g[:, 3] + 0.8 * g[:, 5] + 2.0

    got = least_squares(
        *calibration_set(vectors, prior_all, live_rows, score, users=8, match=match, gather=gather)
    )
    assert len(got) == 10 and np.allclose(got, (0, 1.5, 0, -0.5, 0, 0.8, 0, 0, 0, 0), atol=1e-5)
    assert len(seen) == 8
    for h, c in seen:
        assert c.tolist() == gather(h).tolist()  # scored on exactly the gathered news
        assert len(np.unique(h)) == len(h) and np.isin(h, live_rows).all()  # distinct live clicks
        subs, counts = np.unique(match[h, 1], return_counts=True)
        # half the clicks come from at most 3 subcategories (at most half of their news: here
        # 20 or more, so at least 10 clicks)
        assert np.sort(counts)[::-1][:3].sum() >= min(len(h) // 2, 10)


def test_added_news_are_found_without_a_rebuild():
    vectors = unit(200, seed=1)
    r = Retriever(vectors, RetrievalConfig(queries=1, per_query=5))
    index_before = r.index
    new = unit(3, seed=2)
    r.add(new)  # rows 201..203
    assert r.index is index_before and len(r) == 203
    live = np.ones(204, bool)
    # a user whose one click equals news 202 gets it first (the click itself is row 7, excluded)
    assert r.nearest(new[1:2], np.array([7]), live)[0] == 202


def test_large_pools_use_an_inverted_file_with_high_recall_and_take_appends():
    cfg = RetrievalConfig(queries=2, per_query=50, exact_below=500, nprobe=16, train_sample=3000)
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
        exact = brute(vectors, hist, live, 2, 10)  # each query's exact top-10
        got = set(r.nearest(vectors[hist], hist, live).tolist())
        recalls.append(np.mean([row in got for row in exact]))
    assert np.mean(recalls) >= 0.9
    r.add(vectors[1:4])  # appended rows 3001..3003 (copies of rows 1..3): no retraining
    assert len(r) == 3003 and r.kind == "ivf-sq8"
    assert 3001 in r.nearest(vectors[[1]], np.array([1]), np.ones(3004, bool))[:5].tolist()


def test_an_exact_index_that_outgrows_its_limit_becomes_an_inverted_file():
    cfg = RetrievalConfig(exact_below=300, train_sample=600)
    r = Retriever(unit(200, seed=5), cfg)
    assert (
        r.kind == "flat-int8"
        and Retriever(unit(20), dataclasses.replace(cfg, flat_int8=False)).kind == "exact"
    )
    r.add(unit(450, seed=6))
    assert r.kind == "ivf-sq8" and len(r) == 650


def test_retrieval_vectors_read_metric_head_zero_or_the_unit_news_vectors():
    cls = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    assert np.allclose(retrieval_vectors({"cls": cls}), [[0.6, 0.8], [0.0, 1.0]])
    sim = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # [N, h, D]
    assert np.array_equal(retrieval_vectors({"cls": cls, "sim": sim}, np.array([1])), sim[[1], 0])
    with pytest.raises(ValueError, match="retrieval.nprobe"):
        RetrievalConfig(nprobe=0)


def test_the_fast_paths_equal_their_definitions():
    """The shortlist's top-k selection, the head cosines and the row copies (serving's fast
    paths) give what their plain numpy definitions give, ties and read-only arrays included."""
    rng = np.random.default_rng(3)
    rows = np.arange(500, 700)
    prior = np.round(rng.standard_normal(200), 1)  # many ties, some across the k-th place
    f = np.zeros((200, 4), np.float32)
    # match keys (56-bit hashes, consecutive ids too) looked up by the hash table or, past 700
    # keys, by binary search: a found key's position, and never a false match
    for keys in (
        rng.integers(1, 2**56, 150),
        np.arange(1, 40),
        rng.integers(1, 2**56, 900),
        np.zeros(1, np.int64),
    ):
        keys = np.unique(keys)
        queries = np.concatenate([rng.choice(keys, 500), rng.integers(0, 2**56, 498), [0]]).reshape(-1, 3)
        pos = key_positions(keys, queries)
        found = np.isin(queries, keys)
        assert pos.shape == queries.shape and np.array_equal(keys[pos] == queries, found)
        assert np.array_equal(pos[found], np.searchsorted(keys, queries[found]))
    # `union`: the distinct rows, ascending, less the dropped ones, by a mark array (many rows)
    # or np.unique (few rows of a large pool); an empty part and a dropped row absent from all
    parts = [rng.integers(1, 5000, 3000), np.zeros(0, np.int64), rng.integers(1, 5000, 40)]
    drop = np.array([*parts[2][:5], 4999, 7000])
    want = np.setdiff1d(np.concatenate(parts), drop)
    for n in (5000, 10**7):
        got = union(parts, n, drop)
        assert got.dtype == np.int64 and np.array_equal(got, want)
        assert np.array_equal(union(parts, n), np.unique(np.concatenate(parts)))
    assert len(union([np.zeros(0, np.int64)], 100)) == 0
    for k in (0, 1, 7, 30, 199, 200, 250):
        want = rows[np.argsort(-prior, kind="stable")[:k]]  # ties: the rows' order
        assert shortlist(rows, prior, f, (1.0,), k).tolist() == want.tolist()
    sim = rng.standard_normal((60, 3, 16)).astype(np.float32)
    sim /= np.linalg.norm(sim, axis=2, keepdims=True)  # [N, h, D], unit by row
    cand, clicks = rng.choice(60, 25, replace=False), np.array([4, 9, 11, 30])
    per_head = [sim[cand, k] @ sim[clicks, k].T for k in (1, 2)]
    want = np.stack([c.max(1) for c in per_head] + [c.mean(1) for c in per_head], 1)
    assert np.allclose(head_cosines(sim[:, 1:], cand, clicks), want, atol=1e-6)
    # the proxy's int8 copies: codes and a scale per vector, each code off by at most s / 2
    q8 = quantize(sim)
    every = proxy_rows(q8, np.arange(60))
    decoded, s = every.float().numpy(), every.scale.numpy()  # [60, 3, 16], [60, 3]
    assert q8.dtype == np.int8 and q8.shape == (60, 3, 16 + 4) and isinstance(every, Codes)
    assert np.all(np.abs(decoded - sim) <= s[..., None] / 2 + 1e-7) and not np.allclose(
        decoded, sim, atol=1e-6
    )
    # their cosines: the decoded vectors' (integer dot products, then the scales), and within
    # the rounding's bound of the true ones: |x.h - x'.h'| <= s_x |h|_1 / 2 + s_h |x'|_1 / 2
    cq, hq = proxy_rows(q8[:, 0], cand), proxy_rows(q8[:, 0], clicks)
    got = pair_cosines(cq, hq).numpy()
    assert np.allclose(got, decoded[cand, 0] @ decoded[clicks, 0].T, atol=1e-6)
    bound = (
        s[cand, 0, None] * np.abs(sim[clicks, 0]).sum(1)
        + np.abs(decoded[cand, 0]).sum(1)[:, None] * s[clicks, 0]
    ) / 2
    assert np.all(np.abs(got - sim[cand, 0] @ sim[clicks, 0].T) <= bound + 1e-6)
    low = head_cosines(q8[:, 1:], cand, clicks)
    per_head = [decoded[cand, k] @ decoded[clicks, k].T for k in (1, 2)]
    want_q = np.stack([c.max(1) for c in per_head] + [c.mean(1) for c in per_head], 1)
    assert (
        low.dtype == np.float32 and np.allclose(low, want_q, atol=1e-6) and np.allclose(low, want, atol=2e-2)
    )
    feats = cosine_features(cq, hq, 2)
    assert np.allclose(feats, cosine_features(decoded[cand, 0], decoded[clicks, 0], 2), atol=1e-6)
    frozen = sim.copy()
    frozen.flags.writeable = False  # a memory-mapped store's arrays
    x = unit(3000, seed=4)
    exact = ExactIndex(16)
    for part in np.array_split(x, [1, 700, 2500]):  # grown past its first capacity, in uneven parts
        exact.add(part)
    q = x[[5, 2999, 1200]]
    scores, pos = exact.search(q, 40)
    assert exact.ntotal == 3000 and exact.nbytes() == 3000 * 16 * 4
    assert pos.tolist() == np.argsort(-(q @ x.T), axis=1)[:, :40].tolist()
    assert np.allclose(scores, np.take_along_axis(q @ x.T, pos, 1), atol=1e-6)
    assert np.array_equal(exact.reconstruct_n(10, 5), x[10:15])
    # over int8 codes: the decoded vectors' products, grown the same way
    flat = ExactIndex(16, int8=True)
    for part in np.array_split(x, [1, 700, 2500]):
        flat.add(part)
    xd, qd = (proxy_rows(quantize(a), np.arange(len(a))).float().numpy() for a in (x, q))
    scores8, pos8 = flat.search(q, 40)
    assert flat.nbytes() == 3000 * (16 * 4 + 20) and np.array_equal(flat.reconstruct_n(10, 5), x[10:15])
    assert np.allclose(scores8, np.take_along_axis(qd @ xd.T, pos8, 1), atol=1e-6)
    assert np.all(np.sort(qd @ xd.T, axis=1)[:, ::-1][:, 39] <= scores8[:, -1] + 1e-6)  # the top 40 of those
    assert np.mean([len(set(a) & set(b)) / 40 for a, b in zip(pos8.tolist(), pos.tolist())]) > 0.9
    for a in (sim, frozen):
        assert np.array_equal(retrieval_vectors({"cls": sim[:, 0], "sim": a}, cand), sim[cand, 0])
        assert np.allclose(head_cosines(a[:, 1:], cand, clicks), want, atol=1e-6)
    q8.flags.writeable = False
    assert np.array_equal(proxy_rows(q8, cand).float().numpy(), decoded[cand])


def test_the_first_cut_keeps_the_cheap_proxys_best_for_the_side_paths():
    """Side-path features are computed for the `first_cut` gathered news the cheap proxy ranks
    best (in row order), and for all of them without side paths, cheap weights or more news."""
    rng = np.random.default_rng(31)
    cand = np.arange(500, 530)
    prior, f = rng.standard_normal(30), rng.standard_normal((30, 4)).astype(np.float32)
    cfg = RetrievalConfig(first_cut=8, first_weights=(1.0, 0.0, -2.0, 0.0))
    side = lambda rows, hist: np.zeros((len(rows), 2))  # noqa: E731 (any side path)
    cheap = prior + f[:, 0] - 2.0 * f[:, 2]
    assert first_cut(cfg, cand, prior, f, side).tolist() == sorted(np.argsort(-cheap)[:8].tolist())
    for other in (
        cfg,  # no side paths: nothing to bound
        dataclasses.replace(cfg, first_weights=()),  # not calibrated
        dataclasses.replace(cfg, first_cut=0),  # turned off
        dataclasses.replace(cfg, first_cut=30),  # no more news than the cut
    ):
        got = first_cut(other, cand, prior, f, None if other is cfg else side)
        assert got.tolist() == list(range(30))


def test_the_second_cut_keeps_the_best_by_the_cheap_proxy_and_the_early_features():
    """Of the first cut's news, the rest of the side paths run on the `second_cut` best by the
    cheap features and those `early` gives alone (in row order), and on all of them without
    early features, their weights or more news; early reads the first cut's rows and clicks."""
    rng = np.random.default_rng(32)
    cand, hist = np.arange(700, 730), np.array([3, 9])
    prior, f = rng.standard_normal(30), rng.standard_normal((30, 4)).astype(np.float32)
    e = rng.standard_normal((30, 2)).astype(np.float32)
    seen = []

    def early(rows, clicks):
        seen.append((rows.tolist(), clicks.tolist()))
        return e[rows - 700]

    cfg = RetrievalConfig(second_cut=8, second_weights=(1.0, 0.0, 0.0, 0.0, 0.0, -3.0))
    both = prior + f[:, 0] - 3.0 * e[:, 1]
    keep, given = second_cut(cfg, cand, prior, f, early, hist)
    assert keep.tolist() == sorted(np.argsort(-both)[:8].tolist()) and np.array_equal(given, e[keep])
    assert seen == [(cand.tolist(), hist.tolist())]
    wide, _ = second_cut(cfg, cand, prior, f, early, hist, at_least=12)  # never fewer than returned
    assert wide.tolist() == sorted(np.argsort(-both)[:12].tolist())
    seen.clear()
    for other in (
        cfg,  # no early features
        dataclasses.replace(cfg, second_weights=()),  # not calibrated
        dataclasses.replace(cfg, second_cut=0),  # turned off
        dataclasses.replace(cfg, second_cut=30),  # no more news than the cut
    ):
        got, given = second_cut(other, cand, prior, f, None if other is cfg else early, hist)
        assert got.tolist() == list(range(30)) and given is None
    assert not seen  # and they were not computed for nothing


def test_the_second_cut_serves_only_where_the_pseudo_users_keep_their_top_10():
    """`second_cut_keeps`: the share of each pseudo-user's exact top-10 that the proxy's top_n
    holds without and with the second cut. Scores carried by an early column: the same; by a
    column the second cut does not read: less with it."""
    rng = np.random.default_rng(33)
    users = [300, 250, 0, 280]
    S = sum(users)
    X = np.concatenate([rng.standard_normal((S, 4)), np.ones((S, 1))], 1)  # cheap 0-1, early 2, late 3
    prior = np.zeros(S)
    cfg = RetrievalConfig(top_n=20, first_cut=1000, first_weights=(0.1, 0.1), second_cut=40)
    for early, late, same in ((5.0, 1.0, True), (1.0, 5.0, False)):
        y = early * X[:, 2] + late * X[:, 3]  # the model: the full proxy's weights
        cfg = dataclasses.replace(cfg, weights=(0.0, 0.0, early, late), second_weights=(0.0, 0.0, 1.0))
        off, on = second_cut_keeps(cfg, X, y, prior, users, [0, 1, 2])
        assert off == 1.0
        assert on >= 0.95 if same else on < 0.7
    # the first cut is replayed too: by a column that knows nothing, it loses the top-10
    blind = dataclasses.replace(cfg, first_cut=100, first_weights=(1.0, 0.0))
    assert second_cut_keeps(blind, X, y, prior, users, [0, 1, 2])[0] < 0.6


def test_served_retrieval_follows_appends_updates_and_restarts(served, tmp_path, planted, monkeypatch):
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
    limits = Limits(
        max_news_per_post=3, retrieval=RetrievalConfig(top_n=8, first_cut=60, second_cut=45), store_poll_s=0
    )  # readers: the default, 4

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
        snap = c.app.state.serving.index.snapshot
        hist_rows = np.array([snap.index[h] for h in history])
        clicks = retrieval_vectors(snap.arrays, hist_rows)
        assert snap.index["TWIN"] in snap.retriever.nearest(clicks, hist_rows, snap.live)[:9].tolist()
        assert rank(c)["candidates"] == 8
        # the update moves TWIN to a new row: the old row is never served again
        other = dev.ids.index(dev.ids[-1])
        changed = {**twin, "title": dev.title[other], "category": dev.category[other]}
        assert c.post("/news", json=[changed]).json()["updated"] == 1
        snap = c.app.state.serving.index.snapshot
        old_row = snap.index["TWIN"] - 1
        assert not snap.live[old_row] and snap.live[snap.index["TWIN"]]
        assert old_row not in snap.retrieve(np.array([snap.index[h] for h in history]), 50).tolist()
        assert rank(c)["candidates"] == 8
        # the answer: the gathered news (nearest and best prior) shortlisted by the calibrated
        # proxy, whose prior is the model's score for a user without clicks
        snap, ranker = c.app.state.serving.index.snapshot, c.app.state.serving.ranker
        cfg = snap.retriever.cfg
        assert cfg.weights != RetrievalConfig.weights and cfg.max_history == 50  # calibrated; the run's M
        clicks = retrieval_vectors(snap.arrays, hist_rows)
        best = [r for r in snap.best_prior if r not in hist_rows][: cfg.prior_pool]
        prior = snap.arrays["prior"]
        assert best[0] == max(
            (r for r in np.flatnonzero(snap.live) if r not in hist_rows), key=lambda r: prior[r]
        )
        gathered_near = snap.retriever.nearest(clicks, hist_rows, snap.live).tolist()
        best_before = snap.best_prior.tolist()
        match = snap.arrays["match"]  # the served run has rmbert.feature_match: 6 proxy features
        fields = snap.fields.listed[0].n, cfg.per_entity, cfg.per_subcategory  # and the field lists
        # and the subcategory the trained affinity (eq. 8f) relates most to each clicked one
        related = _related_by_hand(ranker, cfg.weights, cfg.related)
        assert cfg.related == 1 and related and snap.retriever.related is not None
        within = snap.arrays["within"]  # the calibration ordered the subcategory lists (ReaderPrior)
        assert not np.allclose(within[1 : snap.n], prior[1 : snap.n])
        readers = c.app.state.serving.index.readers
        calibrated = len(readers.values)  # the rows at the start; TWIN's two rows came later
        assert np.allclose(
            within[1:calibrated][~np.isnan(readers.values[1:])],
            readers.values[1:][~np.isnan(readers.values[1:])],
        )
        offset = dict(zip(readers.keys.tolist(), readers.offsets))
        scored = 0
        for r in (old_row, snap.index["TWIN"]):  # added later: scored by their subcategory's readers
            hists = readers.clicks.get(int(match[r, 1]), [])
            want = [ranker.score_rows(snap, h, np.array([r]))[0] for h in hists]
            assert r >= calibrated and within[r] == pytest.approx(
                np.mean(want) if want else prior[r] + offset.get(int(match[r, 1]), 0.0), abs=1e-5
            )
            scored += len(want) > 0
        assert scored  # (the served store's news share their subcategories with earlier ones)
        shared = _sharing_by_hand(match, snap.live, snap.live, prior, hist_rows, *fields, related, within)
        assert set(shared) - set(best) - set(gathered_near) and fields[0] < snap.n  # they add news; a tail
        gathered = np.setdiff1d(np.union1d(np.union1d(best, gathered_near), shared), hist_rows)
        # a second metric head: 2 more; rmbert.content_match: 4 more; rmbert.field_affinity: 6 more
        assert len(cfg.weights) == 22 and snap.arrays["sim"].shape[1] == 2
        # the proxy reads int8 copies of the vectors (`proxy_arrays`)
        unit8 = snap.arrays["unit8"]
        assert np.array_equal(unit8[: snap.n], quantize(retrieval_vectors(snap.arrays, slice(snap.n))))
        feats = cosine_features(
            proxy_rows(unit8, gathered),
            proxy_rows(unit8, hist_rows),
            cfg.recent,
            match[gathered],
            match[hist_rows],
        )
        names = ("title_ids", "entity_ids", "title_norm", "category", "subcategory")
        assert ranker.form.proxy_tables == names
        t = {k: torch.from_numpy(snap.arrays[k]) for k in names}
        content = ranker.form.content_proxy(
            {k: v[gathered] for k, v in t.items()}, {k: v[hist_rows] for k, v in t.items()}
        )
        assert content[:, 0].max() > 0  # titles share words
        assert content[:, 4:].abs().max() > 0  # the trained relations and priors (eq. 8f)
        # eq. 8f's max a^s is the 4th feature from the end: the weight `Related` orients A_s by
        A_s = ranker.run.model.rec.A_s.detach().double().numpy()
        sg, sh = snap.arrays["subcategory"][gathered], snap.arrays["subcategory"][hist_rows]
        a_s = A_s[sg][:, sh] * ((sg != 0)[:, None] & (sh != 0)[None, :])  # [G, M]
        assert np.allclose(content[:, -4].double().numpy(), a_s.max(1), atol=1e-5) and a_s.any()
        assert np.array_equal(snap.arrays["heads8"][: snap.n], quantize(snap.arrays["sim"][: snap.n, 1:]))
        feats = np.concatenate(
            [feats, head_cosines(snap.arrays["heads8"], gathered, hist_rows), content.numpy()], 1
        )
        # the first cut: the side paths only for the cheap proxy's best 60 (its 10 weights
        # fitted on the same pseudo-users); the second: eq. 8''''' for those 60 (the content
        # columns, after the second head's two), the rest for the best 45 by the cheap proxy and
        # eq. 8''''' (14 weights, fitted alike); then the full proxy over them
        assert len(cfg.first_weights) == 10 and len(gathered) > cfg.first_cut == 60
        keep = np.sort(
            shortlist(np.arange(len(gathered)), prior[gathered], feats[:, :10], cfg.first_weights, 60)
        )
        assert snap.early_columns == (2, 3, 4, 5) and len(cfg.second_weights) == 14
        assert np.allclose(snap.early(gathered, hist_rows), feats[:, 12:16], atol=1e-6)
        early = feats[keep][:, [*range(10), 12, 13, 14, 15]]
        keep = keep[np.sort(shortlist(np.arange(60), prior[gathered[keep]], early, cfg.second_weights, 45))]
        want = shortlist(gathered[keep], prior[gathered[keep]], feats[keep], cfg.weights, 40)
        assert snap.gather(hist_rows).tolist() == gathered.tolist()  # what calibration fitted on
        got = snap.retrieve(hist_rows, 40)
        assert got.tolist() == want.tolist() and not set(got.tolist()) & set(hist_rows.tolist())
        # with the side-path features of what it returns, which the re-ranker reads instead of
        # computing eq. 8''''' and 8f again: the same scores
        rows, side = snap.retrieve_side(hist_rows, 40)
        at = {r: i for i, r in enumerate(gathered.tolist())}
        assert rows.tolist() == got.tolist() and side.shape == (40, 12)
        assert np.allclose(side, feats[[at[r] for r in rows.tolist()], 10:], atol=1e-6)

        def recomputed(*args):
            raise AssertionError("the re-ranker computed what the retrieval gave it")

        # calibration serves the second cut only where its pseudo-users keep their top-10
        import rmbert.serve.index as index_module

        def fit():
            score = lambda h, cand: ranker.score_rows(snap, h, cand)  # noqa: E731
            return c.app.state.serving.index._fit(snap, score, gathered=True)

        monkeypatch.setattr(index_module, "second_cut_keeps", lambda *a: (1.0, 0.9))
        assert fit()[2] == () and len(fit()[1]) == 10
        monkeypatch.setattr(index_module, "second_cut_keeps", lambda *a: (1.0, 0.999))
        assert len(fit()[2]) == 14
        monkeypatch.undo()
        monkeypatch.setattr(ranker.form, "content_features", recomputed)
        monkeypatch.setattr(ranker.form, "affinity_features", recomputed)
        answer = rank(c)["ranked"]
        monkeypatch.undo()
        ids = [x["id"] for x in answer]
        want_scores = ranker.score_rows(snap, hist_rows, np.array([snap.index[i] for i in ids]))
        assert np.allclose([x["score"] for x in answer], want_scores, rtol=0, atol=1e-5)
        alone = ranker.score_rows(snap, np.zeros(0, np.int64), got[:6])
        assert np.allclose(alone, prior[got[:6]], atol=1e-5)
        # a user without clicks: the news with the best prior, which the model then ranks
        assert snap.retrieve(np.zeros(0, np.int64), 5).tolist() == snap.best_prior[:5].tolist()
        cold = c.post("/rank", json={"history": [], "candidates": None, "top_k": 8}).json()
        assert cold["candidates"] == 8 and cold["history_used"] == 0
    with TestClient(create_app(served / "run", store, limits=limits)) as c:  # a restart
        # the same index over the same live news: the same news gathered, the same best priors
        # (the proxy's weights are calibrated again, on the pool as it is now)
        snap = c.app.state.serving.index.snapshot
        assert len(snap.retriever) == snap.n - 1  # rebuilt from the store: every row, no more
        assert snap.retriever.nearest(clicks, hist_rows, snap.live).tolist() == gathered_near
        assert snap.best_prior.tolist() == best_before
        assert rank(c)["candidates"] == 8


@pytest.mark.parametrize("clicks", [1, 6, 64, 70])
def test_the_proxys_match_features_equal_the_models(clicks):
    """The retrieval proxy's lookup form (one user, click bitsets of 64-bit words) gives the
    model's eq. 8 match features exactly: ids from a small alphabet so that matches happen,
    unknown (0) slots and entity repeats included."""
    rng = np.random.default_rng(clicks)
    cm, hm = rng.integers(0, 30, (300, 7)), rng.integers(0, 30, (clicks, 7))
    cm[:, 5:], cm[:5], hm[:, 6:] = 0, 0, 0
    want = RMBERT.match_features(
        torch.from_numpy(cm)[None], torch.from_numpy(hm)[None], torch.ones(1, clicks, dtype=torch.bool)
    )[0]
    assert np.allclose(match_features(cm, hm), want.numpy())
    assert match_features(cm, hm[:0]).shape == (300, 6) and not match_features(cm, hm[:0]).any()
    # only the entity slots in use are compared; clicks naming no entity share none
    assert (slots_in_use(cm[:, 2:]), slots_in_use(hm[:, 2:]), slots_in_use(cm[:0, 2:])) == (3, 4, 0)
    assert slots_in_use(torch.from_numpy(cm[:, 2:])[None]) == 3  # a tensor [B, C, E] alike
    hm[:, 2:] = 0
    want = RMBERT.match_features(
        torch.from_numpy(cm)[None], torch.from_numpy(hm)[None], torch.ones(1, clicks, dtype=torch.bool)
    )[0]
    assert np.allclose(match_features(cm, hm), want.numpy()) and not match_features(cm, hm)[:, [2, 5]].any()


@pytest.mark.parametrize("clicks", [0, 1, 7])
def test_the_proxys_content_features_equal_the_models(clicks):
    """`RMBERT.content_proxy` (one user, the bag of words over the clicks' words) gives the
    model's eq. 8\'\'\'\'\' content features with every click unmasked."""
    from rmbert.models.rmbert import RMBERTConfig

    torch.manual_seed(clicks)
    m = RMBERT(RMBERTConfig(dim=8, steps=1, content_match=True, vocab_size=40, num_entities=9, vector_dim=3))
    titles = torch.randint(0, 40, (30, 6)).numpy()
    titles[:, 4:] = 0
    vectors = torch.randn(9, 3).numpy()
    vectors[0] = 0
    m.fit_training_news(type("Vocab", (), {"vectors": vectors}), {"title_ids": titles})
    g = torch.Generator().manual_seed(clicks)
    ct, ht = torch.randint(0, 40, (50, 6), generator=g), torch.randint(0, 40, (clicks, 8), generator=g)
    ce, he = torch.randint(0, 9, (50, 4), generator=g), torch.randint(0, 9, (clicks, 4), generator=g)
    user = type(
        "User", (), {"words": ht[None], "ents": he[None], "mask": torch.ones(1, clicks, dtype=torch.bool)}
    )
    want = m.content_features(ct[None], ce[None], user)[0]
    got = m.content_proxy(ct, ce, ht, he)
    assert got.shape == (50, 4) and torch.allclose(got, want, atol=1e-6)
    assert (clicks == 0) == (not got.any())


@pytest.mark.parametrize("clicks", [0, 1, 7])
def test_the_proxys_side_features_equal_the_click_layers(clicks):
    """The folded form's proxy features for one user (eq. 8''''' then eq. 8f, every click
    unmasked) are what the model's click layer reads, the priors alone for no clicks."""
    from rmbert.models.rmbert import RMBERTConfig

    torch.manual_seed(clicks)
    cfg = RMBERTConfig(dim=8, steps=1, content_match=True, vocab_size=40, num_entities=9, vector_dim=3)
    m = RMBERT(dataclasses.replace(cfg, field_affinity=True, num_categories=4, num_subcategories=6))
    with torch.no_grad():
        for p in (m.A_c, m.A_s, m.b_c, m.b_s):
            p.normal_()
    g = torch.Generator().manual_seed(clicks)
    cand = {
        "title_ids": torch.randint(0, 40, (50, 6), generator=g),
        "entity_ids": torch.randint(0, 9, (50, 4), generator=g),
        "category": torch.randint(0, 4, (50,), generator=g),
        "subcategory": torch.randint(0, 6, (50,), generator=g),
    }
    hist = {
        k: torch.randint(0, int(v.max()) + 1, (clicks, *v.shape[1:]), generator=g) for k, v in cand.items()
    }
    f = m.eval().fold()
    assert f.proxy_tables == ("title_ids", "entity_ids", "title_norm", "category", "subcategory")
    got = f.content_proxy(cand, hist)
    # serving keeps each title's norm (`table_terms`): the same features, read instead of computed
    norm = f.table_terms(cand)["title_norm"]
    assert norm.shape == (50,) and torch.equal(f.content_proxy({**cand, "title_norm": norm}, hist), got)
    mask = torch.ones(1, clicks, dtype=torch.bool)
    user = type(
        "User", (), {"words": hist["title_ids"][None], "ents": hist["entity_ids"][None], "mask": mask}
    )
    content = m.content_features(cand["title_ids"][None], cand["entity_ids"][None], user)[0]
    fields = [torch.stack([d["category"], d["subcategory"]], -1)[None] for d in (cand, hist)]
    affinity = m.affinity_features(*fields, mask)[0]
    assert got.shape == (50, 10) and torch.allclose(got, torch.cat([content, affinity], -1), atol=1e-6)
    assert (clicks == 0) == (not got[:, :4].any()) and got[:, 8:].any()


def _related_by_hand(ranker, weights, k: int) -> dict[int, list[int]]:
    """{clicked subcategory's match key: the k others of the largest trained affinity to it,
    oriented by the proxy's weights on eq. 8f's a^s pair, where that affinity is above 0}, from
    the run's A_s and vocabulary."""
    from rmbert.models.tables import match_key

    A = ranker.run.model.rec.A_s.detach().double().numpy()
    subs = ranker.run.vocab.subcategories
    sign = 1.0 if weights[-4] + weights[-3] >= 0 else -1.0
    out = {}
    for j in range(1, len(A)):
        others = sorted((s for s in range(1, len(A)) if s != j), key=lambda s: (-sign * A[s, j], s))
        out[match_key("s", subs[j - 1])] = [
            match_key("s", subs[s - 1]) for s in others[:k] if sign * A[s, j] > 0
        ]
    return out


def _sharing_by_hand(
    match, live_then, live, prior, hist, listed_n, per_entity, per_subcategory, related=None, within=None
):
    """What `sharing` should give, from its definition, one row at a time: per clicked entity
    and subcategory, and per subcategory `related` ({clicked key: [related keys]}) names for a
    clicked one, the best-prior rows (for subcategories: best `within`, the prior if None) among
    those listed (live then) and among those added since (live now); of these, the rows live now."""
    within = prior if within is None else within
    listed = [r for r in range(listed_n) if live_then[r]]
    tail = [r for r in range(listed_n, len(live)) if live[r]]
    subs = {int(s) for s in match[hist, 1]} - {0}
    subs |= {int(t) for s in subs for t in (related or {}).get(s, [])}
    want = set()
    for rows in (listed, tail):
        best_first = sorted(rows, key=lambda r: (-prior[r], r))
        for e in {int(e) for e in match[hist, 2:].ravel()} - {0}:
            want |= set([r for r in best_first if e in match[r, 2:]][:per_entity])
        best_within = sorted(rows, key=lambda r: (-within[r], r))
        for s in subs:
            want |= set([r for r in best_within if match[r, 1] == s][:per_subcategory])
    return sorted(r for r in want if live[r])


def test_the_gather_adds_the_subcategories_the_model_relates_to_the_clicked_ones():
    """`Related`: per clicked subcategory, the others with the largest learned affinity A[s, j]
    (eq. 8f: a candidate of s after a click in j), never the clicked one itself nor the unknown
    id 0, in match keys; the orientation follows the calibrated proxy's weights on a^s; and
    `sharing` gathers their best-prior news as it does the clicked subcategories'."""
    from rmbert.serve.retrieval import FieldLists, Related, sharing

    A = np.array(  # ids 0 (unknown) .. 4; column j: the clicked id
        [
            [9.0, 9.0, 9.0, 9.0, 9.0],
            [0.0, 5.0, 0.3, -2.0, 0.1],
            [0.0, 1.0, 5.0, 0.2, -0.4],
            [0.0, 0.5, 0.1, 5.0, 0.3],
            [0.0, -1.0, 0.2, 0.1, 5.0],
        ]
    )
    keys = np.array([0, 11, 12, 13, 14])
    up = (0.0,) * 10 + (0.5, 0.1, 1.0, 0.5, 0.0, 0.0)  # a^s weighs positively: larger A draws clicks
    rel = Related.build(A, keys, up, k=2)
    assert rel.keys.tolist() == [11, 12, 13, 14]
    assert rel.table.tolist() == [[12, 13], [11, 14], [12, 14], [13, 11]]
    assert rel.of(np.array([11, 14, 99]), 1).tolist() == [12, 13]  # an unknown key relates to none
    down = up[:12] + (-1.0, 0.2) + up[14:]  # the model learned the other orientation
    flipped = Related.build(A, keys, down, k=1)
    assert flipped.table[:, 0].tolist() == [14, 0, 11, 12]  # 12: no other draws its readers
    assert flipped.of(np.array([12, 13]), 1).tolist() == [11]
    assert Related.build(A, keys, (1.0, 1.0), k=1).table[:, 0].tolist() == [12, 11, 12, 13]  # too few: as is
    # sharing: subcategory 12's news join a click in 11 (and 13's, with two relations)
    rng = np.random.default_rng(1)
    n = 120
    match = np.zeros((n, 4), np.int64)
    match[1:, 1] = rng.choice([11, 12, 13, 14], n - 1)
    match[1:, 2] = rng.integers(0, 40, n - 1)
    prior = rng.normal(size=n)
    live = np.ones(n, bool)
    live[0] = False
    fields = FieldLists.build(match, live, prior, None, 50)
    hist = np.flatnonzero(match[:, 1] == 11)[:3]
    for k in (0, 1, 2):
        cfg = RetrievalConfig(per_entity=2, per_subcategory=4, related=k)
        got = sharing(fields, match, live, hist, cfg, rel)
        by_hand = {11: [12, 13][:k]}
        assert got.tolist() == _sharing_by_hand(match, live, live, prior, hist, n, 2, 4, by_hand)
        assert {int(s) for s in match[got, 1]} >= {11, *by_hand[11]}


def test_subcategory_lists_follow_the_models_order_for_the_subcategorys_readers():
    """`ReaderPrior`: a model whose click layer is not additive orders a subcategory's news one
    way for a user without clicks (the prior) and the other way for users who read it. The
    subcategory lists follow the readers' order; a reader is never scored on a news it clicked;
    subcategories too small to sample, and rows with none, keep the prior; a row added later
    is placed by its prior plus its subcategory's mean offset."""
    from rmbert.serve.retrieval import FieldLists, ReaderPrior

    rng = np.random.default_rng(0)
    n = 240
    sub = np.zeros(n, np.int64)
    sub[1:] = rng.choice([11, 12, 13], n - 1)
    sub[[7, 8, 9]], sub[20] = 14, 0  # 14: three news, too few; row 20: no subcategory
    q = rng.normal(size=n)
    prior = -q  # without clicks the model prefers the news its readers like least
    calls = []

    def score(hist, cand):
        assert not np.isin(cand, hist).any()
        assert len(np.unique(hist)) == len(hist) and np.isin(hist, live).all()  # distinct live clicks
        calls.append((len(hist), (sub[hist] == sub[cand[0]]).sum()))
        return np.where(np.isin(sub[cand], sub[hist]), q[cand] + 10.0, prior[cand])

    live = np.arange(1, n - 40)  # rows n-40.. arrive later
    rp = ReaderPrior.build(sub, live, prior, score, readers=3, clicks=10)
    assert len(calls) == 3 * 3 and all(h == 10 and same >= 5 for h, same in calls)  # half of them its own
    big = live[np.isin(sub[live], [11, 12, 13])]
    assert np.allclose(rp.values[big], q[big] + 10.0)
    assert np.isnan(rp.values[[0, 7, 8, 9, 20]]).all() and np.isnan(rp.values[n - 40 :]).all()
    assert rp.keys.tolist() == [11, 12, 13]
    for k, off in zip(rp.keys, rp.offsets):
        rows = big[sub[big] == k]
        assert off == pytest.approx(np.mean(q[rows] + 10.0 - prior[rows]))
    order = rp.order(prior[: n - 40], sub[: n - 40])
    assert np.allclose(order[big], q[big] + 10.0) and np.allclose(order[[7, 20]], prior[[7, 20]])
    assert sorted(rp.clicks) == [11, 12, 13] and all(len(h) == 3 for h in rp.clicks.values())
    added = np.arange(n - 40, n)  # rows added since: scored by the same readers of their subcategory
    got = rp.score(added, sub[added], score)
    known = np.isin(sub[added], [11, 12, 13])
    assert np.allclose(got[known], q[added][known] + 10.0) and np.isnan(got[~known]).all()
    assert len(calls) == 9 + 3 * len(np.unique(sub[added][known]))  # one call per reader
    later = rp.order(prior[n - 40 :], sub[n - 40 :], first=n - 40)  # without: prior + offset
    offset = dict(zip(rp.keys.tolist(), rp.offsets))
    assert np.allclose(later, prior[n - 40 :] + np.array([offset.get(int(k), 0.0) for k in sub[n - 40 :]]))
    # the subcategory lists: best for the readers first, where the prior would put them last
    match = np.zeros((n - 40, 4), np.int64)
    match[:, 1] = sub[: n - 40]
    is_live = np.zeros(n - 40, bool)
    is_live[live] = True
    lists = FieldLists.build(match, is_live, prior[: n - 40], None, 50, order).listed[1]
    rows11 = big[sub[big] == 11]
    assert lists.top(np.array([11]), 5).tolist() == rows11[np.argsort(-q[rows11])][:5].tolist()
    by_prior = FieldLists.build(match, is_live, prior[: n - 40], None, 50).listed[1]
    assert by_prior.top(np.array([11]), 5).tolist() == rows11[np.argsort(q[rows11])][:5].tolist()
    with pytest.raises(ValueError, match="retrieval.readers"):
        RetrievalConfig(readers=-1)


def test_the_gather_finds_news_sharing_a_field_with_the_clicks():
    """`FieldLists` and `sharing`: per clicked entity and subcategory, the best-prior news among
    those listed at the last rebuild (less those replaced since) and among those added since;
    the listed part is rebuilt once more than `relist_after` news were added or replaced.
    Checked against the definition, row by row, on ids from a small alphabet (repeats,
    unknown 0s, ties, keys with fewer rows than asked for, keys no live row carries)."""
    from rmbert.serve.retrieval import FieldLists, sharing

    rng = np.random.default_rng(0)
    n = 400
    match = rng.integers(0, 9, size=(n, 6))  # category, subcategory, 4 entities; 0 = none
    rare = rng.random((n, 6)) < 0.02
    match[rare] = rng.integers(20, 30, size=int(rare.sum()))  # keys with a few rows each
    match[0] = 0  # the null row
    prior = np.round(rng.normal(size=n), 1)  # ties
    live_then = rng.random(n) > 0.1
    live_then[0] = False
    cfg = RetrievalConfig(per_entity=7, per_subcategory=3, relist_after=50, max_history=30)
    listed_n = 300  # rows 300.. arrive after the lists were built
    first = FieldLists.build(match[:listed_n], live_then[:listed_n], prior, None, 50)
    live = live_then.copy()
    gathered = sharing(first, match, live_then[:listed_n], np.array([5, 17, 230]), cfg)
    live[gathered[[0, 5, 9]]] = False  # updates retire 3 listed rows that were gathered
    fields = FieldLists.build(match[:340], live[:340], prior, first, 50)
    assert fields.listed is first.listed and fields.tail[0].n == 340  # kept; a tail of 40
    named = int(np.flatnonzero((match[1:300, 2:] >= 20).any(1))[0]) + 1  # a click naming a rare entity
    for hist in ([5, 17, 230], [1], [named, 310], list(range(1, 40)), list(range(1, 340))):
        got = sharing(fields, match, live[:340], np.array(hist), cfg)
        window = hist[-30:]  # the model's max_history
        assert got.tolist() == _sharing_by_hand(match, live_then, live[:340], prior, window, listed_n, 7, 3)
    off = dataclasses.replace(cfg, per_entity=0, per_subcategory=0)
    assert len(sharing(fields, match, live[:340], np.array([5, 310]), off)) == 0
    assert not fields.listed[0].stale(live[:350], 50)
    assert fields.listed[0].stale(live[:351], 50)  # 51 added
    many = live[:340].copy()
    many[np.flatnonzero(many[:listed_n])[:48]] = False  # 51 or more replaced
    assert FieldLists.build(match[:340], many, prior, first, 50).listed is not first.listed
    empty = FieldLists.build(match[:1], np.zeros(1, bool), prior, None, 50)  # no news at all
    assert len(sharing(empty, match, np.zeros(1, bool), np.zeros(0, np.int64), cfg)) == 0
    with pytest.raises(ValueError, match="retrieval.relist_after"):
        RetrievalConfig(relist_after=0)


def test_serve_flags_set_the_retrieval_config_and_a_bad_key_is_named():
    from rmbert.cli import build_parser, serve_limits

    def limits(*flags: str):
        return serve_limits(build_parser().parse_args(["serve", "RUN", "--store", "S", *flags]))

    default = limits()
    assert default.retrieval == RetrievalConfig() and default.max_queue == 64
    got = limits("--retrieve", "50", "--readers", "0", "--set", "retrieval.per_subcategory=300")
    assert (got.retrieval.top_n, got.retrieval.readers, got.retrieval.per_subcategory) == (50, 0, 300)
    assert got.retrieval.per_query == RetrievalConfig.per_query  # the rest as before
    assert limits("--set", "max_batch=2").max_batch == 2
    with pytest.raises(ValueError, match="retrieval.per_subcategory must be >= 0, not -1"):
        limits("--set", "retrieval.per_subcategory=-1")
    with pytest.raises(ValueError, match="RetrievalConfig has no field 'per_sub'"):
        limits("--set", "retrieval.per_sub=3")
