"""Beyond-accuracy metrics of ranked lists, each a pure function with its usual definition.

Every impression's candidates are ranked by score and its top k kept (k = 10 by default, fewer when
an impression has fewer candidates). Lists are given as CSR arrays like the official metrics.

* Intra-list diversity (Smyth & McClave 2001; Ziegler et al. 2005, "Improving recommendation lists
  through topic diversification"): the mean pairwise dissimilarity of a list's items, averaged over
  lists; dissimilarity 1 - [same category], or 1 - cosine of the items' vectors.
* Novelty (Zhou et al. 2010, "Solving the apparent diversity-accuracy dilemma", self-information):
  the mean over a list of -log2 p(i), p(i) the share of training clicks on news i, smoothed by one
  click for every news (a news never clicked in training is the most novel).
* Catalogue coverage (Ge, Delgado-Battenfeld & Jannach 2010, "Beyond accuracy"): the share of the
  distinct candidate news that appear in at least one top-k list.
* Personalisation (Zhou et al. 2010): 1 - the mean overlap |L_a & L_b| / k over pairs of lists
  (a random sample of pairs when there are many).

Diversification: maximal marginal relevance (Carbonell & Goldstein 1998, "The use of MMR,
diversity-based reranking"), `mmr_order`, used by `/rank` ("diversity") and `rmbert evaluate
--diversity` so that its accuracy cost can be measured.
"""

from __future__ import annotations

import numpy as np


def top_k_lists(scores: np.ndarray, ptr: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the candidate rows) of each impression's top k by score, as CSR arrays.
    Ties keep the earlier candidate first."""
    out, out_ptr = [], [0]
    for i in range(len(ptr) - 1):
        s = scores[ptr[i] : ptr[i + 1]]
        order = np.argsort(-s, kind="stable")[:k]
        out.append(order + ptr[i])
        out_ptr.append(out_ptr[-1] + len(order))
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), np.array(out_ptr, np.int64)


def intra_list_diversity(lists: np.ndarray, ptr: np.ndarray, dissimilarity) -> float:
    """Mean over lists (of 2 or more items) of the mean pairwise dissimilarity(a, b) of its items."""
    values = []
    for i in range(len(ptr) - 1):
        items = lists[ptr[i] : ptr[i + 1]]
        n = len(items)
        if n < 2:
            continue
        d = dissimilarity(items)  # [n, n]
        values.append(float(d[np.triu_indices(n, 1)].mean()))
    return float(np.mean(values)) if values else float("nan")


def category_dissimilarity(categories: np.ndarray):
    def d(items: np.ndarray) -> np.ndarray:
        c = categories[items]
        return (c[:, None] != c[None, :]).astype(np.float64)

    return d


def embedding_dissimilarity(vectors: np.ndarray):
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def d(items: np.ndarray) -> np.ndarray:
        u = unit[items]
        return 1.0 - u @ u.T

    return d


def novelty(lists: np.ndarray, ptr: np.ndarray, clicks: np.ndarray) -> float:
    """Mean over lists of the mean self-information -log2 p(i) of its items; clicks[i] = training
    clicks of item i, p(i) = (clicks[i] + 1) / (sum(clicks) + number of items)."""
    p = (clicks + 1.0) / (clicks.sum() + len(clicks))
    info = -np.log2(p)
    per = [info[lists[ptr[i] : ptr[i + 1]]].mean() for i in range(len(ptr) - 1) if ptr[i + 1] > ptr[i]]
    return float(np.mean(per)) if per else float("nan")


def coverage(lists: np.ndarray, candidates: np.ndarray) -> float:
    """Distinct items in the lists / distinct candidate items."""
    return len(np.unique(lists)) / max(len(np.unique(candidates)), 1)


def personalisation(lists: np.ndarray, ptr: np.ndarray, k: int, pairs: int = 20000, seed: int = 0) -> float:
    """1 - mean |L_a & L_b| / k over pairs of lists (all pairs, or `pairs` random ones)."""
    n = len(ptr) - 1
    if n < 2:
        return float("nan")
    sets = [set(lists[ptr[i] : ptr[i + 1]].tolist()) for i in range(n)]
    if n * (n - 1) // 2 <= pairs:
        a, b = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
        keep = a != b
        a, b = a[keep], b[keep]
    overlap = [len(sets[x] & sets[y]) / k for x, y in zip(a.tolist(), b.tolist())]
    return 1.0 - float(np.mean(overlap))


def beyond_metrics(
    scores: np.ndarray,
    ptr: np.ndarray,
    items: np.ndarray,
    categories: np.ndarray,
    vectors: np.ndarray,
    clicks: np.ndarray,
    k: int = 10,
) -> dict[str, float]:
    """All four for one split: `items` [rows] maps each candidate row to an item index, into
    categories [N] (ints), vectors [N, D] and training clicks [N]."""
    pos, lptr = top_k_lists(scores, ptr, k)
    lists = items[pos]
    return {
        f"ild_category@{k}": intra_list_diversity(lists, lptr, category_dissimilarity(categories)),
        f"ild_embedding@{k}": intra_list_diversity(lists, lptr, embedding_dissimilarity(vectors)),
        f"novelty@{k}": novelty(lists, lptr, clicks),
        f"coverage@{k}": coverage(lists, items),
        f"personalisation@{k}": personalisation(lists, lptr, k),
    }


def mmr_order(relevance: np.ndarray, unit: np.ndarray | None, k: int, diversity: float) -> np.ndarray:
    """The first min(k, C) picks of maximal marginal relevance over C candidates: repeatedly the
    candidate maximising (1 - diversity) * r_i - diversity * max_{j picked} cos(i, j), with r the
    relevance min-max scaled to [0, 1] within the list (so `diversity` in [0, 1] is scale-free) and
    `unit` [C, D] unit vectors; ties go to the more relevant candidate. The first pick is the most relevant one (at diversity = 1 too);
    diversity = 0 is the plain ranking by relevance."""
    C = len(relevance)
    k = max(0, min(k, C))
    if diversity <= 0.0 or C < 2 or unit is None or not np.isfinite(relevance).all():
        return np.argsort(-relevance, kind="stable")[:k]  # (non-finite scores: no scaling is possible)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(np.ptp(relevance))
    r = (relevance - relevance.min()) / (span if span > 0 else 1.0)
    free = np.ones(C, bool)
    picks = [int(np.argmax(r))]
    free[picks[0]] = False
    penalty = unit @ unit[picks[0]]  # max cosine to what is picked
    for _ in range(k - 1):
        obj = np.where(free, (1.0 - diversity) * r - diversity * penalty, -np.inf)
        best = np.flatnonzero(obj >= obj.max() - 1e-12)  # ties go to the more relevant
        i = int(best[np.argmax(r[best])])
        picks.append(i)
        free[i] = False
        penalty = np.maximum(penalty, unit @ unit[i])
    return np.array(picks, dtype=np.int64)


def mmr_scores(
    scores: np.ndarray, ptr: np.ndarray, unit: np.ndarray, diversity: float, k: int = 10
) -> np.ndarray:
    """Per impression (CSR `ptr`), scores whose ranking is MMR's top k (`unit` [rows, D] the
    candidates' unit vectors) followed by the other candidates by score: what a user shown the
    diversified list sees, for the ranking metrics."""
    out = np.empty(len(scores), dtype=np.float64)
    for s, e in zip(ptr[:-1], ptr[1:]):
        rel = scores[s:e]
        top = mmr_order(rel, unit[s:e], k, diversity)
        rest = np.setdiff1d(np.argsort(-rel, kind="stable"), top, assume_unique=True)
        rest = rest[np.argsort(-rel[rest], kind="stable")]
        order = np.concatenate([top, rest])
        out[s + order] = -np.arange(len(order), dtype=np.float64)
    return out
