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
