import math
import zipfile

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import rmbert.metrics as metrics_module
from rmbert.metrics import (
    SubmissionError,
    blocks,
    mind_metrics,
    per_impression,
    pooled_auc,
    ranks_from_scores,
    read_prediction_lines,
    score_submission,
    write_prediction_zip,
)


def official(y_true, y_score):
    """The official MIND formulas, one impression at a time (independent of the vectorized code)."""

    def dcg(y, s, k):
        order = np.argsort(s, kind="stable")[::-1]
        y = np.take(y, order[:k])
        return np.sum((2**y - 1) / np.log2(np.arange(len(y)) + 2))

    order = np.argsort(y_score, kind="stable")[::-1]
    yt = np.take(y_true, order)
    mrr = np.sum(yt / (np.arange(len(yt)) + 1)) / np.sum(y_true)
    return {
        "auc": roc_auc_score(y_true, y_score),
        "mrr": mrr,
        "ndcg@5": dcg(y_true, y_score, 5) / dcg(y_true, y_true, 5),
        "ndcg@10": dcg(y_true, y_true * 0 + y_score, 10) / dcg(y_true, y_true, 10),
    }


def random_impressions(rng, n=300, ties=False):
    sizes = rng.integers(2, 40, n)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(ptr[-1]) < 0.2).astype(np.int8)
    scores = rng.integers(0, 4, ptr[-1]).astype(float) if ties else rng.random(ptr[-1])
    return labels, scores, ptr


@pytest.mark.parametrize("ties", [False, True])
def test_matches_official_per_impression(ties):
    rng = np.random.default_rng(1)
    labels, scores, ptr = random_impressions(rng, ties=ties)
    per = per_impression(labels, scores, ptr)
    n_valid = 0
    for i in range(len(ptr) - 1):
        y, s = labels[ptr[i] : ptr[i + 1]].astype(float), scores[ptr[i] : ptr[i + 1]]
        if y.sum() == 0 or y.sum() == len(y):
            assert not per["valid"][i]
            continue
        n_valid += 1
        ref = official(y, s)
        for k in ref:
            assert per[k][i] == pytest.approx(ref[k], abs=1e-9), (i, k)
    m = mind_metrics(labels, scores, ptr)
    assert m["impressions"] == n_valid and m["skipped"] == len(ptr) - 1 - n_valid


def test_hand_worked_case():
    # Impression: scores [0.9, 0.1, 0.5, 0.3], clicks on candidates 2 and 3 (0.1 and 0.5).
    labels = np.array([0, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    m = mind_metrics(labels, scores, np.array([0, 4]))
    # AUC: positive pairs ranked above negatives: (0.5 > 0.3) only -> 1 of 4 pairs.
    assert m["auc"] == pytest.approx(0.25)
    # Ranking: 0.9(0) 0.5(1) 0.3(0) 0.1(1) -> MRR = (1/2 + 1/4) / 2
    assert m["mrr"] == pytest.approx(0.375)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@5"] == pytest.approx(dcg / idcg) and m["ndcg@10"] == pytest.approx(dcg / idcg)


def test_ties_count_half_and_single_class_skipped():
    m = mind_metrics(np.array([1, 0, 1, 1]), np.array([0.5, 0.5, 0.2, 0.3]), np.array([0, 2, 4]))
    assert m["auc"] == pytest.approx(0.5) and m["impressions"] == 1 and m["skipped"] == 1


def test_pooled_auc_differs_from_mind_auc():
    # Each impression is ranked perfectly, but the score scales differ between impressions.
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.2, 0.1, 0.9, 0.8])
    assert mind_metrics(labels, scores, np.array([0, 2, 4]))["auc"] == pytest.approx(1.0)
    assert pooled_auc(labels, scores) == pytest.approx(0.75)


def test_ranks_and_zip_roundtrip(tmp_path):
    ptr = np.array([0, 3, 5])
    scores = np.array([0.1, 0.7, 0.3, 2.0, 2.0])
    assert ranks_from_scores(scores, ptr).tolist() == [3, 1, 2, 2, 1]
    path = write_prediction_zip(tmp_path / "prediction.zip", np.array([11, 12]), ptr, scores)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["prediction.txt"]
        assert zf.read("prediction.txt").decode() == "11 [3,1,2]\n12 [2,1]\n"
    assert read_prediction_lines(path) == ["11 [3,1,2]", "12 [2,1]"]


def test_score_submission_equals_metrics_of_scores(tmp_path):
    rng = np.random.default_rng(5)
    labels, scores, ptr = random_impressions(rng, n=200)
    ids = np.arange(100, 300)
    lines = read_prediction_lines(write_prediction_zip(tmp_path / "p.zip", ids, ptr, scores))
    got = score_submission(lines, ids, ptr, labels)
    # Ranks carry the order of distinct scores, so the metrics are those of the scores.
    want = mind_metrics(labels, scores, ptr)
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert got[k] == pytest.approx(want[k], abs=1e-6)
    # and agree with the official per-impression formulas applied to 1/rank
    ranks = ranks_from_scores(scores, ptr)
    ref = [
        official(labels[ptr[i] : ptr[i + 1]].astype(float), 1.0 / ranks[ptr[i] : ptr[i + 1]])
        for i in range(200)
        if 0 < labels[ptr[i] : ptr[i + 1]].sum() < ptr[i + 1] - ptr[i]
    ]
    assert got["auc"] == pytest.approx(np.mean([r["auc"] for r in ref]), abs=1e-6)
    assert got["ndcg@10"] == pytest.approx(np.mean([r["ndcg@10"] for r in ref]), abs=1e-6)


def test_blocks_cover_every_impression_once():
    ptr = np.array([0, 3, 4, 14, 16, 18, 19])  # impression 2 alone is wider than a block
    got = blocks(ptr, rows=4)
    assert got == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert all(ptr[b] - ptr[a] <= 4 or b == a + 1 for a, b in got)
    assert blocks(np.array([0])) == []


def test_blocked_metrics_ranks_zip_and_scoring_equal_one_block(tmp_path, monkeypatch):
    """MIND-large's 89M test rows are processed in blocks of impressions; every result must be
    the one of a single block, whatever the block size (here blocks of about 50 rows)."""
    rng = np.random.default_rng(7)
    labels, scores, ptr = random_impressions(rng, n=300, ties=True)
    ids = np.arange(1, 301)
    whole = per_impression(labels, scores, ptr, block_rows=10**9)
    zip_whole = write_prediction_zip(tmp_path / "whole.zip", ids, ptr, scores)
    ranks_whole = ranks_from_scores(scores, ptr)
    score_whole = score_submission(read_prediction_lines(zip_whole), ids, ptr, labels)

    monkeypatch.setattr(metrics_module, "BLOCK_ROWS", 50)
    monkeypatch.setattr(metrics_module, "PARSE_LINES", 7)
    assert len(blocks(ptr)) > 100
    split = per_impression(labels, scores, ptr)
    for k in whole:
        np.testing.assert_array_equal(split[k], whole[k])
    np.testing.assert_array_equal(ranks_from_scores(scores, ptr), ranks_whole)
    zip_split = write_prediction_zip(tmp_path / "split.zip", ids, ptr, scores)
    assert read_prediction_lines(zip_split) == read_prediction_lines(zip_whole)
    assert score_submission(read_prediction_lines(zip_split), ids, ptr, labels) == score_whole
    bad = read_prediction_lines(zip_whole)
    bad[250] = f"251 [{','.join(['0'] * int(ptr[251] - ptr[250]))}]"
    with pytest.raises(SubmissionError, match="prediction.txt:251: ranks must be 1"):
        score_submission(bad, ids, ptr, labels)


def test_missing_lines_count_as_equal_ranks():
    ptr = np.array([0, 2, 4])
    labels = np.array([1, 0, 0, 1])
    got = score_submission(["1 [1,2]"], np.array([1, 2]), ptr, labels)
    assert got["missing_lines"] == 1
    assert got["auc"] == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize(
    "lines,needle",
    [
        (["1 [1,2]", "3 [1,2]"], "prediction.txt:2: impression id 3"),
        (["1 [1,2", "2 [1,2]"], "prediction.txt:1: invalid line"),
        (["1 [1,2,3]", "2 [1,2]"], "prediction.txt:1: 3 ranks for 2"),
        (["1 [1,a]", "2 [1,2]"], "prediction.txt:1"),
        (["1 [0,1]", "2 [1,2]"], "prediction.txt:1: ranks must be 1"),
    ],
)
def test_bad_submissions_name_the_line(lines, needle):
    with pytest.raises(SubmissionError, match=needle.replace("[", r"\[")):
        score_submission(lines, np.array([1, 2]), np.array([0, 2, 4]), np.array([1, 0, 0, 1]))


def test_not_a_zip(tmp_path):
    p = tmp_path / "x.zip"
    p.write_text("hello")
    with pytest.raises(SubmissionError, match="not a zip"):
        read_prediction_lines(p)
