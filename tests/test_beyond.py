"""Beyond-accuracy metrics against hand-worked lists."""

import math

import numpy as np
import pytest

from rmbert.beyond import (
    beyond_metrics,
    category_dissimilarity,
    coverage,
    embedding_dissimilarity,
    intra_list_diversity,
    mmr_order,
    mmr_scores,
    novelty,
    personalisation,
    top_k_lists,
)


def test_top_k_lists_rank_by_score_ties_keep_order():
    pos, ptr = top_k_lists(np.array([0.1, 0.9, 0.5, 0.3, 0.3]), np.array([0, 3, 5]), k=2)
    assert pos.tolist() == [1, 2, 3, 4] and ptr.tolist() == [0, 2, 4]
    pos, ptr = top_k_lists(np.array([0.1, 0.9, 0.5]), np.array([0, 3]), k=10)
    assert pos.tolist() == [1, 2, 0] and ptr.tolist() == [0, 3]


def test_intra_list_diversity_by_category_and_embedding():
    cats = np.array([0, 0, 1, 1, 1])
    lists, ptr = np.array([0, 1, 2, 3, 4]), np.array([0, 3, 5])
    # list 1: pairs (a,a)=0 (a,b)=1 (a,b)=1 -> 2/3; list 2: (b,b) -> 0; mean 1/3
    assert intra_list_diversity(lists, ptr, category_dissimilarity(cats)) == pytest.approx(1 / 3)
    vecs = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    # list 1: 1-cos: (0,1)=0, (0,2)=1, (1,2)=1 -> 2/3; list 2: (3,4) = 1 - 1/sqrt(2)
    want = (2 / 3 + (1 - 1 / math.sqrt(2))) / 2
    assert intra_list_diversity(lists, ptr, embedding_dissimilarity(vecs)) == pytest.approx(want)
    assert math.isnan(intra_list_diversity(np.array([0]), np.array([0, 1]), category_dissimilarity(cats)))


def test_novelty_is_smoothed_self_information():
    clicks = np.array([3.0, 0.0, 1.0])  # p = [4/7, 1/7, 2/7]
    lists, ptr = np.array([0, 1, 2]), np.array([0, 2, 3])
    want = ((-math.log2(4 / 7) - math.log2(1 / 7)) / 2 + -math.log2(2 / 7)) / 2
    assert novelty(lists, ptr, clicks) == pytest.approx(want)


def test_coverage_and_personalisation():
    assert coverage(np.array([0, 2, 2]), np.array([0, 1, 2, 3, 3])) == pytest.approx(0.5)
    lists, ptr = np.array([0, 1, 0, 2, 3, 4]), np.array([0, 2, 4, 6])
    # overlaps / k: (A,B) = 1/2, (A,C) = 0, (B,C) = 0 -> 1 - 1/6
    assert personalisation(lists, ptr, k=2) == pytest.approx(5 / 6)
    same = np.array([0, 1, 0, 1]), np.array([0, 2, 4])
    assert personalisation(*same, k=2) == pytest.approx(0.0)


def test_beyond_metrics_maps_rows_to_items():
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.7])
    ptr = np.array([0, 3, 6])
    items = np.array([0, 1, 2, 0, 3, 2])  # candidate rows -> news
    m = beyond_metrics(scores, ptr, items, np.array([0, 0, 1, 1]), np.eye(4), np.array([5.0, 0, 0, 1]), k=2)
    # top 2: impression 1 -> rows 0, 2 -> news 0, 2; impression 2 -> rows 4, 5 -> news 3, 2
    assert m["coverage@2"] == pytest.approx(3 / 4)
    assert m["ild_category@2"] == pytest.approx(0.5)  # (0: cat 0, 2: cat 1) differ; (3, 2) both cat 1
    assert m["ild_embedding@2"] == pytest.approx(1.0) and m["personalisation@2"] == pytest.approx(0.5)


def test_mmr_by_hand():
    """rel [1, .9, 0]; items 0 and 1 identical, 2 orthogonal. diversity .5: after 0, item 1 scores
    .5 * .9 - .5 * 1 = -.05 and item 2 scores .5 * 0 - .5 * 0 = 0, so 2 comes second."""
    rel = np.array([1.0, 0.9, 0.0])
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mmr_order(rel, unit, 3, 0.0).tolist() == [0, 1, 2]
    assert mmr_order(rel, unit, 3, 0.5).tolist() == [0, 2, 1]
    assert mmr_order(rel, unit, 2, 0.5).tolist() == [0, 2]
    # diversity .04: item 1 scores .96 * .9 - .04 = .824 > item 2's 0: relevance wins
    assert mmr_order(rel, unit, 3, 0.04).tolist() == [0, 1, 2]
    # relevance is scaled within the list: multiplying scores changes nothing
    assert mmr_order(rel * 100 - 7, unit, 3, 0.5).tolist() == [0, 2, 1]


def test_mmr_scores_rank_the_diversified_top_then_the_rest():
    scores = np.array([1.0, 0.9, 0.0, 0.5, 5.0, 4.0])
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ptr = np.array([0, 4, 6])
    out = mmr_scores(scores, ptr, unit, 0.5, k=2)
    # impression 1: MMR top 2 = [0, 2], then 1 (0.9) and 3 (0.5) by score
    assert np.argsort(-out[:4]).tolist() == [0, 2, 1, 3]
    assert np.argsort(-out[4:]).tolist() == [0, 1]
    assert np.array_equal(np.argsort(-mmr_scores(scores, ptr, unit, 0.0)[:4]), np.argsort(-scores[:4]))


def test_mmr_at_full_diversity_still_starts_with_the_most_relevant():
    rel = np.array([0.1, 0.2, 0.9])
    unit = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert mmr_order(rel, unit, 3, 1.0).tolist() == [2, 0, 1]


def test_mmr_edge_cases():
    unit = np.eye(3)
    # non-finite scores cannot be scaled: plain order by score (NaN last as argsort puts it)
    assert mmr_order(np.array([1.0, np.nan, 3.0]), unit, 3, 0.5).tolist()[0] == 2
    assert mmr_order(np.array([1.0, 2.0, 3.0]), unit, 0, 0.5).tolist() == []
    assert mmr_order(np.array([5.0]), unit[:1], 10, 0.5).tolist() == [0]
    # ties at full diversity (all orthogonal: every penalty 0) go to the more relevant
    assert mmr_order(np.array([0.1, 0.5, 0.9]), unit, 3, 1.0).tolist() == [2, 1, 0]
