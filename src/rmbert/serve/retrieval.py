"""The retrieval stage of two-stage ranking: candidates from the whole live pool, then re-ranking.

A `/rank` request without candidates is ranked against every live news in the store, not just
the freshest few: the retrieval stage picks `top_n` news from the whole pool and the recommender
re-ranks those.

The choice of user vector. RMBERT scores a (user, candidate) pair through p reasoning steps
whose attention depends on the candidate, so no single user vector reproduces its score. The
retrieval space is instead the one the default model's click layer already reads: eq. 8''' of
`models/rmbert.py` hands it the max and mean cosine of the candidate to the clicked news in the
learned metric S (head 0); a model without eq. 8''' uses its unit news vectors the same way.
Beside these, the model gives every news a candidate-only prior (its score for a user without
clicks: category, popularity, recency as the run learned them), computed once per news when it
enters the serving index. Retrieval runs in two steps:

1. Gather: an ANN index (faiss) returns the `per_query` nearest live news of each of Q queries:
   the clicks' normalised mean (the mean-cosine term) and the user's `interests`, centroids of
   the recent clicks by spherical k-means (the max-cosine term; a user with fewer clicks: each
   click), which search 1M news in 60% of the time of a query per click and, deeper per query,
   gather more of the model's top news (planted story data, 34k-news pool: recall@200 0.929 ->
   0.950; docs/benchmarks.md); the `prior_pool` news with the best prior join them. A model whose click layer reads
   categories and entities (`rmbert.feature_match`: the serving array "match") also gets the
   news that share a field with the clicks rather than lie near them (`FieldLists`): the
   `per_entity` best-prior news naming each entity the clicks name, and the `per_subcategory`
   best-prior news of each subcategory they fall in. Without them, a model that scores by
   shared entities finds its top news outside the gathered set (planted entity data,
   recall@200: 0.57 without, 1.0 with); on planted drift data, the 80 best of the clicks'
   subcategories gather as much as the 30 best of every subcategory (0.91 and 0.90), at a cost
   that does not grow with the number of subcategories; on a pool of 34k news (about 800 per
   subcategory) the default 150 lift recall@200 from 0.91 to 0.97. A model with `rmbert.field_affinity` as
   well names, per clicked subcategory, the `related` one its learned affinity A_s (eq. 8f)
   ties most to it (`Related`), whose `per_subcategory` best-prior news join too: readers of
   one subcategory drawn to another (planted drift data, 7k-news pool: recall@200 0.918 ->
   0.967). A subcategory's list is ordered by `ReaderPrior` (`rmbert serve --readers K`,
   default 4): the model's mean score for K pseudo-readers of the subcategory, not the prior
   (a user without clicks), which is not how the default model orders a subcategory's news for
   a user with clicks: on planted drift data's 34k-news pool recall@200 is 0.76 by the prior
   and 0.96 with 4 readers (docs/benchmarks.md).
2. Shortlist: each gathered news gets the proxy score
       prior + w . [max_j c_j, mean_j c_j, max_j' c_j', mean_j' c_j']
   with c_j = cos(x, h_j) over the user's clicks (from int8 copies: `proxy_arrays`) and j' over the
   `recent` most recent ones (models with recency embeddings weigh them more). A model with
   `rmbert.feature_match` adds the six features its click layer reads (eq. 8''''): the shares
   and indicators of clicks sharing the news's category, subcategory or an entity; one with
   `rmbert.content_match` the four of eq. 8''''' (the max and mean title-word and entity
   cosines to the clicks, `RMBERT.content_proxy`); one with more than one metric head the max
   and mean cosine in each of the others (`head_cosines`; planted drift data, 150 users:
   recall@200 0.83 -> 0.90); one with `rmbert.field_affinity` the six of
   eq. 8f (the learned category and subcategory relations to the clicks, and the priors;
   `FoldedRMBERT.proxy_features`). These side-path features are computed only for the
   `first_cut` news that the cheap proxy (the cosine and match features, calibrated apart)
   ranks best (`first_cut`), so their cost stops growing with the pool; of those, a model with
   eq. 8''''' gets it first, and the rest of its side paths only for the `second_cut` best by
   the cheap proxy and eq. 8''''' (`second_cut`), where calibration's pseudo-users keep their
   top-10 with it (`second_cut_keeps`). The best `top_n` go to the re-ranker.

The weights are calibrated when the service loads (`calibrate`): pseudo-users' candidates are
scored exhaustively by the model, and w is the least-squares fit of (score - prior) on these
features. The final fit is on what the shortlist ranks, the news step 1 gathers for each
pseudo-user (whose clicks are half within 1-3 subcategories, half anywhere): fitted on random
and near news instead, the weights did not carry over to real users' gathered sets (planted
drift data, a 34k-news pool: recall@200 0.789, against 0.973 now with 150 news per clicked
subcategory). Nothing extra is trained: every part comes from the run itself. `benchmarks/retrieval.py` measures the cost, as the recall of the exact top-10 of
exhaustive scoring of the whole pool.

Index. Pools below `exact_below` news are searched exhaustively (`ExactIndex`, over int8 codes
unless `flat_int8` is false: 34k news, 17 queries, 10.7 -> 4.4 ms; the same recall); larger ones
with an inverted file over 8-bit scalar-quantised vectors (IndexIVFScalarQuantizer, about
3 sqrt(n) lists, `nprobe` of them per query), trained once on a sample. Fresh news are added to the index
as they reach the serving index (no rebuild, no retraining); an exact index that outgrows
`exact_below` twice over is rebuilt as an inverted file once. Index position i holds store row
i + 1, so the index and the serving rows grow together; a row replaced by a later version of its
news (an update) stays in the index but is filtered out, as are rows the request's snapshot does
not have yet. A restart rebuilds the index from the store, so it always matches the store.

Shape letters: N news in the index, Q queries, G gathered news, M clicks, D the vector width.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rmbert.config import require_at_least
from rmbert.models.rmbert import slots_in_use


@dataclass(frozen=True)
class RetrievalConfig:
    top_n: int = 200  # news handed to the re-ranker (0 = no retrieval: the freshest news instead)
    queries: int = 50  # the most recent clicks searched, besides their mean
    interests: int = 16  # searched as this many centroids of theirs (`interests`; 0: each click)
    per_query: int = 400  # nearest news gathered per query
    prior_pool: int = 300  # news with the best candidate-only prior gathered for every user
    per_entity: int = 100  # best-prior news gathered per entity the clicks name (0: none)
    per_subcategory: int = 150  # best-prior news gathered per subcategory the clicks fall in (0: none)
    related: int = 1  # more subcategories per clicked one: those eq. 8f relates most to it (0: none)
    readers: int = 4  # pseudo-readers per subcategory that order its list (`ReaderPrior`; 0: the prior)
    relist_after: int = 4096  # news added or replaced before the field lists are rebuilt
    recent: int = 5  # the most recent clicks of the proxy's last two features
    weights: tuple[float, ...] = (1.0, 1.0, 0.0, 0.0)  # w of the proxy (set by `calibrate`; 4 to 14 weights)
    first_cut: int = 2000  # news kept by the cheap proxy for the side-path features (0: all)
    first_weights: tuple[float, ...] = ()  # w of the cheap proxy (set by `calibrate`; (): no first cut)
    second_cut: int = 500  # of those, news kept by the cheap proxy and eq. 8''''' for the rest (0: all)
    second_weights: tuple[float, ...] = ()  # its w (set by `calibrate`; (): no second cut)
    max_history: int = 50  # the most recent clicks the cosines are taken over (the run's M)
    exact_below: int = 50_000  # smaller pools are searched exhaustively
    flat_int8: bool = True  # ... over int8 codes (`ExactIndex`); false: float32, exactly
    nprobe: int = 8  # inverted lists visited per query (larger pools)
    lists_per_sqrt: float = 3.0  # the inverted file has this times sqrt(N) lists
    train_sample: int = 131_072  # news the inverted file's centroids and quantiser are fitted on

    def __post_init__(self) -> None:
        names = ("queries", "per_query", "max_history", "exact_below", "nprobe", "train_sample")
        require_at_least(self, "retrieval", 1, (*names, "lists_per_sqrt"))
        require_at_least(
            self,
            "retrieval",
            0,
            (
                "top_n",
                "interests",
                "prior_pool",
                "per_entity",
                "per_subcategory",
                "related",
                "readers",
                "first_cut",
                "second_cut",
            ),
        )
        require_at_least(self, "retrieval", 1, ("relist_after",))


def take(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """a[rows] for an int array rows, copied by torch's `index_select` on every core (numpy's
    fancy index copies on one: 11k rows of 384 floats from a 1M-row pool, 4.5 ms -> 1.4 ms on 2
    cores); a read-only array (a memory-mapped store) or a dtype torch lacks is indexed by numpy."""
    idx = np.asarray(rows, dtype=np.int64)
    if not a.flags.writeable or a.dtype.kind not in "fi":
        return a[idx]
    return torch.from_numpy(a).index_select(0, torch.from_numpy(idx)).numpy()


def union(parts: list[np.ndarray], n: int, drop: np.ndarray | None = None) -> np.ndarray:
    """The distinct rows of `parts` (each row < n), ascending, less those in `drop` [int64].
    Many rows: marked in an [n] bool array and read back, where np.unique sorts them (14k rows
    of a 1M pool: 1.7 -> 0.4 ms); few rows of a large pool: np.unique."""
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if 256 * len(rows) < n:
        out = np.unique(rows)
        return (out if drop is None else out[~np.isin(out, drop)]).astype(np.int64)
    mark = np.zeros(n, bool)
    mark[rows] = True
    if drop is not None:
        mark[drop[drop < n]] = False
    return np.flatnonzero(mark).astype(np.int64)


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 array as a tensor, sharing its memory where it can (a tensor: itself)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def as_float(a: np.ndarray | torch.Tensor | Codes) -> np.ndarray:
    """Vectors as a float32 array (`Codes` of `proxy_rows` decoded)."""
    if isinstance(a, Codes):
        return a.float().numpy()
    return a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)


# The proxy's copies of the serving vectors (`proxy_arrays`) are int8: each vector's codes,
# then its float32 scale's four bytes, so that one row copy fetches both
SCALE_BYTES = 4


def quantize(x: np.ndarray) -> np.ndarray:
    """Floats [..., D] -> [..., D + 4] int8: each vector's codes round(x / s), s = max |x| / 127,
    then s as float32 bytes (`proxy_rows` reads both back). A code is off by at most s / 2."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    s = np.abs(x).max(-1, keepdims=True) / 127
    s = np.where(s > 0, s, 1).astype(np.float32)  # [..., 1]
    return np.concatenate([np.rint(x / s).astype(np.int8), s.view(np.int8)], -1)


@dataclass(frozen=True)
class Codes:
    """Rows of a `quantize`d array: codes [..., D] int8 (a strided view of the rows) and their
    scales [...] float32; a vector is codes * scale."""

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def of(rows: torch.Tensor) -> Codes:
        """`quantize`d rows [..., D + 4] int8 -> their codes and scales."""
        return Codes(
            rows[..., :-SCALE_BYTES], rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)[..., 0]
        )

    def __getitem__(self, key) -> Codes:
        return Codes(self.codes[key], self.scale[key])

    def float(self) -> torch.Tensor:
        return self.codes.float() * self.scale[..., None]


def proxy_rows(a: np.ndarray, rows: np.ndarray) -> torch.Tensor | Codes:
    """a[rows]: `Codes` for a `quantize`d (int8) array, else a float32 tensor (`take`)."""
    if a.dtype != np.int8:
        return _tensor(take(a, rows))
    idx = np.asarray(rows, dtype=np.int64)
    if not a.flags.writeable:  # (a read-only array: numpy copies the rows, not the whole)
        got = torch.from_numpy(a[idx])
    else:
        got = torch.from_numpy(a).index_select(0, torch.from_numpy(idx))
    return Codes.of(got)


def pair_cosines(
    cand: np.ndarray | torch.Tensor | Codes, clicks: np.ndarray | torch.Tensor | Codes, scaled: bool = True
) -> torch.Tensor:
    """Unit vectors cand [G, D] and clicks [M, D] (float32 arrays or tensors, or both `Codes`)
    -> their cosines [G, M] float32. Codes multiply as int8 (exact integer dot products,
    AVX512-VNNI), then scale: 13k news of a 1M pool against 50 clicks, row copy and product
    4.1 -> 2.1-2.4 ms on 2 cores, against bfloat16 copies. scaled=False (Codes): the cosines
    before the candidates' scales, cos / cand.scale[:, None], for a caller that reduces over
    the clicks first (a max or mean commutes with a positive factor: G products, not G M)."""
    if isinstance(cand, Codes) and isinstance(clicks, Codes):
        dots = torch._int_mm(cand.codes, clicks.codes.T).float()  # [G, M], exact below D = 1040
        dots.mul_(clicks.scale)
        return dots.mul_(cand.scale[:, None]) if scaled else dots
    return (_tensor(cand) @ _tensor(clicks).T).float()


def _reduced(cand: np.ndarray | torch.Tensor | Codes, clicks: np.ndarray | torch.Tensor | Codes, reduce):
    """reduce(cosines [G, M]) -> [G, k] of cand and clicks (see `pair_cosines`), with the
    candidates' int8 scales applied to the G k reduced values instead of the G M cosines
    (reduce must commute with a positive factor per candidate: maxima and means do)."""
    codes = isinstance(cand, Codes) and isinstance(clicks, Codes)
    out = reduce(pair_cosines(cand, clicks, scaled=not codes))
    return out.mul_(cand.scale[:, None]) if codes else out


def proxy_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The proxy's int8 copies of serving arrays (`quantize`): "unit8" [n, D + 4], the retrieval
    vectors, and for a model with more than one metric head "heads8" [n, h - 1, D + 4], heads
    1... The proxy's cosines over thousands of gathered news then read a quarter of the bytes
    (this machine's memory bandwidth bounds them) and multiply as int8. A cosine moves by at
    most sum_d (s_x |h_d| + s_h |x_d|) / 2: 2.7e-3 at most over 2M pairs of the story run's
    vectors (D = 384), as with the bfloat16 copies they replace (2.6e-3); only the proxy reads
    these (the re-ranker reads float32)."""
    out = {"unit8": quantize(retrieval_vectors(arrays))}
    if "sim" in arrays and arrays["sim"].shape[1] > 1:
        out["heads8"] = quantize(arrays["sim"][:, 1:])
    return out


def retrieval_vectors(arrays: dict[str, np.ndarray], rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """Unit vectors [n, D] float32 of the retrieval space for serving-array `rows`: the model's
    metric head 0 (`sim`, eq. 8''') where it has one, else the unit news vectors."""
    if "sim" in arrays:  # head 0 alone is read: [rows, 0] copies D values per row, not h D
        if isinstance(rows, np.ndarray):
            return np.asarray(take(arrays["sim"][:, 0], rows), dtype=np.float32)
        return np.ascontiguousarray(arrays["sim"][rows, 0], dtype=np.float32)
    x = np.asarray(arrays["cls"][rows], dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def cosine_features(
    cand: np.ndarray | torch.Tensor,
    clicks: np.ndarray | torch.Tensor,
    recent: int = 5,
    cand_match: np.ndarray | None = None,
    click_match: np.ndarray | None = None,
) -> np.ndarray:
    """Unit vectors cand [G, D] and clicks [M, D] (oldest first; arrays, or tensors of one
    dtype, or `Codes` of `proxy_rows`) -> [G, 4] float32: the max and mean
    cosine to all clicks, then to the `recent` most recent. With match ids of both ([G, F],
    [M, F]; a model with `rmbert.feature_match`), 6 more: the shares and indicators of clicks
    sharing the candidate's category, subcategory or an entity, as eq. 8'''' reads them ([G, 10])."""

    # torch: its matmul and reductions use every core without numpy BLAS's spinning threads,
    # which took a core from the next faiss search (1M news: search 21 -> 10 ms)
    def reduce(cos: torch.Tensor) -> torch.Tensor:  # [G, M] -> [G, 4]
        last = cos[:, -recent:]
        return torch.stack([cos.amax(1), cos.mean(1), last.amax(1), last.mean(1)], 1)

    out = _reduced(cand, clicks, reduce).numpy()
    if cand_match is None or click_match is None:
        return out
    return np.concatenate([out, match_features(cand_match, click_match).astype(out.dtype)], 1)


def head_cosines(heads: np.ndarray, cand: np.ndarray, clicks: np.ndarray) -> np.ndarray:
    """Metric heads 1.. of eq. 8''' (`heads` [n, h - 1, D], unit vectors by row, floats, or
    `quantize`d [n, h - 1, D + 4]; head 0 is the retrieval space, already read): the max and
    mean cosine of rows cand [G] to the clicks [M] in each head, [G, 2 (h - 1)] float32 (maxima
    first)."""
    c, h = proxy_rows(heads, cand), proxy_rows(heads, clicks)  # [G, h - 1, D], [M, h - 1, D]
    # a product per head, on strided views: einsum's copy of c to [h - 1, G, D] and its batched
    # product took longer (2,000 news, 3 heads, 50 clicks, alone: 4.3 -> 1.4 ms, the same values)
    per_head = [
        _reduced(c[:, k], h[:, k], lambda cos: torch.stack([cos.amax(1), cos.mean(1)], 1))  # [G, 2]
        for k in range(heads.shape[1])
    ]
    out = torch.stack(per_head, 2)  # [G, 2, h - 1]: maxima, then means
    return out.reshape(len(cand), -1).numpy()


# odd 64-bit multipliers of `key_positions`' multiplicative hash (the golden ratio's first)
_MULTIPLIERS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64
)


def key_positions(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions [...] in `keys` [K] (distinct, ascending, non-negative) of `queries` [...]: the
    key's where a query is one, else any position (the caller compares keys[pos]). A table of
    2^b >= 2 K^2 slots hashes the keys multiplicatively (the top b bits of key x a, uint64), with
    the first multiplier that puts no two keys in one slot: one gather per query, where a binary
    search costs about 20 ns each (13k gathered news' 5 match ids, the clicks' 100 distinct
    ones: 1.2 -> 0.4 ms). Keys that no multiplier separates, or over 700 of them: binary search."""
    K = len(keys)
    bits = max(4, (2 * K * K).bit_length())
    if 0 < K and bits <= 20:
        shift = np.uint64(64 - bits)
        k = keys.astype(np.uint64)
        for a in _MULTIPLIERS:
            slot = (k * a) >> shift
            if len(np.unique(slot)) == K:
                table = np.zeros(1 << bits, np.intp)
                table[slot] = np.arange(K)
                return table[(queries.astype(np.uint64) * a) >> shift]
    return np.minimum(np.searchsorted(keys, queries), max(K - 1, 0))


def match_features(cand: np.ndarray, clicks: np.ndarray) -> np.ndarray:
    """Match ids of candidates [G, F] and of one user's clicks [M, F] -> [G, 6], what
    `RMBERT.match_features` gives with every click unmasked (tested equal), in O(G E + M E)
    instead of its candidate x click x entity x entity comparison: a category or subcategory
    is looked up among the clicks' (with its count of clicks); an entity among the clicks'
    distinct entities, each with the bitset of the clicks naming it, so that a click sharing
    two entities with the candidate counts once."""
    G, M = len(cand), len(clicks)
    if M == 0:
        return np.zeros((G, 6), np.float32)

    def lookup(values: np.ndarray, queries: np.ndarray):
        """Distinct `values` [M, ...], each query's position among them [G, ...], and whether
        a query is found there (0, none, never is)."""
        keys = np.unique(values)
        pos = key_positions(keys, queries)
        return keys, pos, (keys[pos] == queries) & (queries != 0)

    counts = []
    for col in (0, 1):  # category, subcategory: how many clicks share the candidate's
        keys, pos, found = lookup(clicks[:, col], cand[:, col])
        per_key = np.bincount(np.searchsorted(keys, clicks[:, col]), minlength=len(keys))
        counts.append(np.where(found, per_key[pos], 0))
    W = (M + 63) // 64  # words of a click bitset
    he, ce = clicks[:, 2 : 2 + slots_in_use(clicks[:, 2:])], cand[:, 2 : 2 + slots_in_use(cand[:, 2:])]
    union = np.zeros((G, W), np.uint64)  # [G, W]: the clicks sharing an entity with the candidate
    if he.size and ce.size:  # [M, E_h], [G, E_c]: the entity slots in use
        keys, pos, found = lookup(he, ce)
        bits = np.zeros((len(keys) + 1, W), np.uint64)  # bits[k]: the clicks naming keys[k]; last: none
        m = np.repeat(np.arange(M), he.shape[1])
        np.bitwise_or.at(
            bits, (np.searchsorted(keys, he.ravel()), m // 64), np.uint64(1) << (m % 64).astype(np.uint64)
        )
        at = np.where(found, pos, len(keys))  # [G, E_c]
        for e in range(at.shape[1]):  # a slot at a time (13k news: 0.33 -> 0.1 ms)
            union |= bits[at[:, e]]
    counts.append(np.bitwise_count(union).sum(1))
    n = np.stack(counts, 1)  # [G, 3]: clicks matching in each kind
    out = np.empty((G, 6), np.float32)
    out[:, :3], out[:, 3:] = n / M, n > 0
    return out


# A model's side-path features for the proxy (eq. 8''''', 8f): (gathered rows [G], click rows [M]) -> [G, k]
Content = Callable[[np.ndarray, np.ndarray], np.ndarray] | None


def with_content(features: np.ndarray, content: Content, cand: np.ndarray, hist: np.ndarray) -> np.ndarray:
    """The proxy's features [G, F] of rows cand [G] for clicks hist [M], followed by the model's
    side-path features [G, k] where it has them (`content` not None)."""
    if content is None:
        return features
    return np.concatenate([features, content(cand, hist).astype(features.dtype)], 1)


def shortlist(rows: np.ndarray, prior: np.ndarray, features: np.ndarray, weights, k: int) -> np.ndarray:
    """The k rows [G] of the best proxy prior + features @ w ([G, F] `cosine_features`; a w
    shorter than F weighs the rest 0), best first (ties: the rows' order)."""
    return rows[best_positions(prior, features, weights, k)]


def best_positions(prior: np.ndarray, features: np.ndarray, weights, k: int) -> np.ndarray:
    """The positions [<= k] that `shortlist` keeps, best first."""
    w = np.zeros(features.shape[1], dtype=features.dtype)
    given = np.asarray(weights, dtype=features.dtype)[: features.shape[1]]
    w[: len(given)] = given
    # einsum's own loop, not BLAS (see cosine_features), nor a [G, F] product then its sum
    # (13k news: 0.35 -> 0.08 ms)
    proxy = np.asarray(prior, np.float64) + np.einsum("gf,f->g", features, w)
    if 0 < k < len(proxy):  # the k best (and any tied with the k-th) before the stable sort
        keep = np.flatnonzero(proxy >= np.partition(proxy, len(proxy) - k)[len(proxy) - k])
        return keep[np.argsort(-proxy[keep], kind="stable")[:k]]
    return np.argsort(-proxy, kind="stable")[:k]


def least_squares(X: np.ndarray, y: np.ndarray, columns: int | list[int] | None = None) -> tuple[float, ...]:
    """w [F] (or one per column kept): the least-squares fit of y [S] on features X [S, F + 1]
    (a constant last), on all F features, on the first `columns` (the cheap proxy of the first
    cut: `cosine_features` without the model's side-path ones) or on the columns listed (the
    second cut's: those and eq. 8'''''); the default weights for an empty set."""
    if len(X) == 0:
        return RetrievalConfig.weights
    if isinstance(columns, int) or columns is None:
        columns = list(range(X.shape[1] - 1 if columns is None else columns))
    keep = [*columns, X.shape[1] - 1]
    return tuple(float(v) for v in np.linalg.lstsq(X[:, keep], y, rcond=None)[0][:-1])


def calibration_set(
    vectors: np.ndarray | Callable[[np.ndarray], np.ndarray],
    prior: np.ndarray,
    live_rows: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    users: int = 16,
    cands: int = 256,
    seed: int = 0,
    recent: int = 5,
    match: np.ndarray | None = None,
    content: Content = None,
    gather: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk: int = 65_536,
    rows_out: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """X [S, F + 1], y [S]: the proxy's features (a constant last) and score - prior over pseudo-users
    (5-50 random live news as clicks; random candidates and the clicks' nearest neighbours, so
    that close news are represented). With match ids, every other pseudo-user clicks within 1-3
    subcategories and its candidates add news of those subcategories, as real users' and the
    gather step's do (planted drift data, 100 users: recall@200 0.78 -> 0.83; all pseudo-users
    so: 0.71; clicks drawn around a few news in vector space fitted no better either).
    `vectors`: the retrieval vectors by row, [n, D] or rows -> their vectors (so that the pool's
    are not copied whole: 1.5 GB at 1M news); `prior` [n] by row; `score(hist_rows,
    cand_rows)` is the model's exhaustive score; `match` [n, F]: the match ids by row (a model
    with `rmbert.feature_match`: the proxy then has 10 features); `content`: a model's content
    features (`rmbert.content_match`: 4 more).

    With `gather(hist_rows) -> rows` (step 1 as served, clicks left out), the fit is on what
    the shortlist ranks: a pseudo-user's candidates are the news gathered for it, and with
    match ids each pseudo-user clicks half within 1-3 subcategories and half anywhere. Fitted
    so, the proxy carries over to real users (planted drift data, a 34k-news pool, the exact
    top-10 of 150 real users: recall@200 0.777 -> 0.909, where a fit on those real users' own
    gathered sets reaches 0.913; docs/benchmarks.md). rows_out: each pseudo-user's candidate
    rows are appended to it, in X's order."""
    rows_of = vectors if callable(vectors) else vectors.__getitem__  # `chunk` rows' cosines held at once
    rng = np.random.default_rng(seed)
    X, y = [], []
    for u in range(users):
        if len(live_rows) < 20:
            break
        size = int(rng.integers(5, min(50, len(live_rows) // 4) + 1))
        if gather is not None:
            hist = _mixed_clicks(rng, live_rows, None if match is None else match[live_rows, 1], size)
            cand = gather(hist)
            if len(cand) == 0:
                continue
        else:
            within = None if match is None or u % 2 == 0 else _interests(rng, live_rows, match[live_rows, 1])
            if within is not None:
                size = min(size, len(within) // 2)  # leave some of them to be candidates
            hist = rng.choice(live_rows if within is None else within, size, replace=False)
            rest = np.setdiff1d(live_rows, hist)
            clicked = as_float(rows_of(hist))
            nearness = [
                (as_float(rows_of(rest[i : i + chunk])) @ clicked.T).max(1)
                for i in range(0, len(rest), chunk)
            ]
            near = rest[np.argsort(-np.concatenate(nearness))[: cands // 4]]
            parts = [near, rng.choice(rest, min(len(rest), cands), replace=False)]
            if within is not None:  # and news of the same subcategories, which the gather step adds
                same = rest[np.isin(match[rest, 1], match[hist, 1])]
                parts.append(rng.choice(same, min(len(same), cands // 4), replace=False))
            cand = np.unique(np.concatenate(parts))
        f = cosine_features(rows_of(cand), rows_of(hist), recent, *_match_of(match, cand, hist))
        f = with_content(f, content, cand, hist)
        X.append(np.concatenate([f, np.ones((len(f), 1), f.dtype)], 1))
        y.append(score(hist, cand) - prior[cand])
        if rows_out is not None:
            rows_out.append(cand)
    if not X:
        return np.zeros((0, 1)), np.zeros(0)
    return np.concatenate(X).astype(np.float64), np.concatenate(y).astype(np.float64)


@dataclass(frozen=True)
class KeyLists:
    """Rows grouped by a key they carry (a subcategory, an entity; 0 = none), each group best
    prior first: where the gather step finds the news that share a field with the clicks."""

    keys: np.ndarray  # [K] distinct keys, ascending
    starts: np.ndarray  # [K + 1] where each key's rows begin in `rows`
    rows: np.ndarray  # [R] rows grouped by key, best prior first within a key (ties: row order)
    n: int  # the rows below n were listed (those live then)
    dead: int  # rows below n that were not live then

    @staticmethod
    def build(key_of: np.ndarray, live: np.ndarray, prior: np.ndarray, lo: int = 0) -> KeyLists:
        """key_of [n, E] the keys of every row; live [n] bool; prior [n]: the live rows of
        lo..n-1 listed."""
        rows = lo + np.flatnonzero(live[lo:])
        keys = key_of[rows]  # [L, E]
        r, k = np.repeat(rows, keys.shape[1]), keys.ravel()
        keep = k != 0
        r, k = r[keep], k[keep]
        order = np.lexsort((r, -prior[r], k))
        r, k = r[order], k[order]
        same = np.zeros(len(k), bool)  # a row naming a key twice: listed once
        same[1:] = (k[1:] == k[:-1]) & (r[1:] == r[:-1])
        r, k = r[~same], k[~same]
        distinct, first = np.unique(k, return_index=True)
        return KeyLists(distinct, np.append(first, len(k)), r, len(live), int(len(live) - live.sum()))

    def stale(self, live: np.ndarray, relist_after: int) -> bool:
        """Rebuild? (more than `relist_after` rows were added, or replaced, since the build)"""
        added, dead = len(live) - self.n, int(self.n - live[: self.n].sum())
        return added > relist_after or dead - self.dead > relist_after

    def top(self, keys: np.ndarray, per_key: int) -> np.ndarray:
        """The first `per_key` rows of each of `keys` (distinct; unknown keys give none), key by key."""
        if len(self.keys) == 0:
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        idx = pos[self.keys[pos] == keys]
        first = self.starts[idx]
        size = np.minimum(self.starts[idx + 1] - first, per_key)
        offsets = np.repeat(first - np.cumsum(size) + size, size)  # each taken row's group start
        return self.rows[offsets + np.arange(int(size.sum()))]


@dataclass(frozen=True)
class FieldLists:
    """The gather step's lists for a model with match ids (`rmbert.feature_match`): rows by
    entity and by subcategory. `listed` covers the rows live at the last rebuild, which happens
    once more than `relist_after` news were added or replaced since; `tail` the rows added
    since, rebuilt with every snapshot (few)."""

    listed: tuple[KeyLists, KeyLists]  # by entity, by subcategory
    tail: tuple[KeyLists, KeyLists]

    @staticmethod
    def build(
        match: np.ndarray,
        live: np.ndarray,
        prior: np.ndarray,
        previous: FieldLists | None,
        relist_after: int,
        within: np.ndarray | None = None,
    ) -> FieldLists:
        """match [n, F] (category, subcategory, entities by row), live [n], prior [n]; the
        previous snapshot's lists, kept unless stale; within [n]: the order of a subcategory's
        news (`ReaderPrior.order`; None: the prior)."""
        within = prior if within is None else within

        def lists(lo: int) -> tuple[KeyLists, KeyLists]:
            by_entity = KeyLists.build(match[:, 2:], live, prior, lo)
            return by_entity, KeyLists.build(match[:, 1:2], live, within, lo)

        keep = previous is not None and not previous.listed[0].stale(live, relist_after)
        listed = previous.listed if keep else lists(0)
        return FieldLists(listed, lists(listed[0].n))


@dataclass(frozen=True)
class ReaderPrior:
    """How the model orders a subcategory's news for users who read it: each news's mean score
    for `readers` pseudo-readers of its subcategory (half of their clicks random news of it,
    half random news of the pool), which orders the subcategory lists of the gather step
    instead of the prior. The prior is a user without clicks, and the default model's click
    layer is not additive in the user's and the news's terms: for users with clicks it orders a
    subcategory's news otherwise (planted drift data, 34k-news pool: the top-10 news that the
    gather missed lay at a median rank of 197 by prior within a clicked subcategory).
    Computed with the calibration (when the service starts), for the rows live then; a row
    added since is scored by the same pseudo-readers of its subcategory (`score`, kept in
    `clicks`) as it enters the serving index. Placed by its prior plus its subcategory's mean
    offset (reader prior - prior) instead, as it was before, the news added after the start
    lost the readers' order: planted drift data, 34k-news pool, recall@200 0.970 with every news
    reader-scored, 0.827 with every news placed so. A store rebuilt under a running service
    drops back to the prior."""

    values: np.ndarray  # [m] by row below m: the reader prior (NaN: not computed)
    keys: np.ndarray  # [K] subcategory match keys, ascending
    offsets: np.ndarray  # [K] their mean reader prior - prior
    clicks: dict[int, list[np.ndarray]] = field(default_factory=dict)  # key -> its readers' clicks

    @staticmethod
    def build(
        sub: np.ndarray,
        live_rows: np.ndarray,
        prior: np.ndarray,
        score: Callable[[np.ndarray, np.ndarray], np.ndarray],
        readers: int = 4,
        clicks: int = 20,
        seed: int = 0,
    ) -> ReaderPrior:
        """sub [m] the subcategory match key of every row (0: none); live_rows the rows to
        order; prior [m]; `score(hist_rows, cand_rows)` the model's exhaustive score."""
        rng = np.random.default_rng(seed)
        values = np.full(len(sub), np.nan)
        keys, offsets = [], []
        hists: dict[int, list[np.ndarray]] = {}
        rows_by = live_rows[np.argsort(sub[live_rows], kind="stable")]
        distinct, starts = np.unique(sub[rows_by], return_index=True)
        for key, rows in zip(distinct, np.split(rows_by, starts[1:])):
            if key == 0 or len(rows) < 4:
                continue
            total, count = np.zeros(len(rows)), np.zeros(len(rows))
            for _ in range(readers):
                own = rng.choice(rows, min(clicks // 2, len(rows) // 2), replace=False)
                need = min(clicks - len(own), len(live_rows) - len(own))
                # `need` distinct live news other than `own`, uniformly (no pass over the pool)
                drawn = rng.choice(live_rows, need + len(own), replace=False)
                more = drawn[~np.isin(drawn, own)][:need]
                hist = np.concatenate([own, more])  # distinct clicks
                rng.shuffle(hist)
                hists.setdefault(int(key), []).append(hist)
                got = ~np.isin(rows, hist)  # a news is not scored for a reader who clicked it
                total[got] += score(hist, rows[got])
                count[got] += 1
            done = count > 0
            values[rows[done]] = total[done] / count[done]
            keys.append(key)
            offsets.append(float(np.mean(values[rows[done]] - prior[rows[done]])) if done.any() else 0.0)
        return ReaderPrior(values, np.asarray(keys, np.int64), np.asarray(offsets), hists)

    def score(
        self, rows: np.ndarray, sub: np.ndarray, score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """Reader priors [k] of rows added since the build (subcategory keys sub [k]): their mean
        score for the pseudo-readers of their subcategory; NaN where it has none."""
        out = np.full(len(rows), np.nan)
        for key in np.unique(sub):
            at = np.flatnonzero(sub == key)
            hists = self.clicks.get(int(key), [])
            if hists:
                out[at] = np.mean([score(h, rows[at]) for h in hists], axis=0)
        return out

    def order(self, prior: np.ndarray, sub: np.ndarray, first: int = 0) -> np.ndarray:
        """The within-subcategory order key [k] of rows first..first+k-1, with prior [k] and
        subcategory keys [k]."""
        out = prior.astype(np.float64)
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, sub), len(self.keys) - 1)
            out = out + np.where(self.keys[pos] == sub, self.offsets[pos], 0.0)
        known = self.values[first : first + len(out)]
        has = ~np.isnan(known)
        out[: len(known)][has] = known[has]
        return out


def sharing(
    fields: FieldLists,
    match: np.ndarray,
    live: np.ndarray,
    hist_rows: np.ndarray,
    cfg: RetrievalConfig,
    related: Related | None = None,
) -> np.ndarray:
    """Live rows [S] that share a field with the clicks (match [n, F]: category, subcategory,
    entities by row; live [n]; hist_rows: the clicks, oldest first, of which the model reads
    the last `max_history`): the `per_entity` best-prior news naming each of the clicks'
    entities and the `per_subcategory` best-prior news of each of their subcategories and of
    the `cfg.related` subcategories `related` relates most to each, among the rows listed (less
    those replaced since) and among the rows added since. Clicks included (the caller drops
    them)."""
    hist = hist_rows[-cfg.max_history :]
    ents, subs = np.unique(match[hist, 2:]), np.unique(match[hist, 1])
    ents, subs = ents[ents != 0], subs[subs != 0]
    if related is not None and cfg.related:
        subs = np.union1d(subs, related.of(subs, cfg.related))
    got = [np.zeros(0, np.int64)]
    for by_entity, by_subcategory in (fields.listed, fields.tail):
        if cfg.per_entity and len(ents):
            got.append(by_entity.top(ents, cfg.per_entity))
        if cfg.per_subcategory and len(subs):
            got.append(by_subcategory.top(subs, cfg.per_subcategory))
    rows = union(got, len(live))
    return rows[live[rows]]


@dataclass(frozen=True)
class Related:
    """For each subcategory a model knows, the others its learned affinity relates most to it:
    A_s of eq. 8f (`RMBERT.affinity_features`), read as "readers of subcategory j click s". The
    gather step adds their best-prior news (planted drift data, whose users are drawn to a hidden
    second subcategory of each they read: recall@200 0.918 -> 0.967, with one relation per
    clicked subcategory as with two; story and entity data unchanged at 0.995 and 1.000). Used
    where the field lists are, so for a model with both `rmbert.feature_match` (the "match"
    array the lists are keyed by) and `rmbert.field_affinity`."""

    keys: np.ndarray  # [K] the clicked subcategories' match keys, ascending
    table: np.ndarray  # [K, k] per key, its related subcategories' match keys, most related first (0: none)

    @staticmethod
    def build(affinity: np.ndarray, keys: np.ndarray, weights, k: int = 1) -> Related:
        """affinity [N_s, N_s]: A[s, j], the learned affinity of a candidate of subcategory id s to
        a clicked news of id j; keys [N_s]: the match key of each id (0 for id 0, unknown);
        weights: the calibrated proxy weights, whose last six are eq. 8f's features (max and mean
        of a^c, of a^s, then the priors; `FoldedRMBERT.proxy_features` puts them last): the sign
        of the a^s pair says whether a larger A draws clicks (the click layer may have learned
        either orientation). A relation must draw clicks: an affinity at or below 0 in that
        orientation (A starts at 0; pairs training never showed stay there) is none."""
        w = np.asarray(weights, dtype=np.float64)
        sign = 1.0 if len(w) < 6 or w[-4] + w[-3] >= 0 else -1.0
        A = sign * np.asarray(affinity, dtype=np.float64).T  # [j, s]
        A[:, 0] = -np.inf  # an unknown subcategory is nobody's relation
        np.fill_diagonal(A, -np.inf)  # nor is the clicked subcategory itself (gathered anyway)
        k = max(0, min(k, len(A) - 2))
        top = np.argsort(-A, axis=1, kind="stable")[:, :k]  # [N_s, k]
        table = np.where(np.take_along_axis(A, top, 1) > 0, keys[top], 0)
        known = keys != 0
        order = np.argsort(keys[known], kind="stable")
        return Related(keys[known][order], table[known][order])

    def of(self, subs: np.ndarray, k: int) -> np.ndarray:
        """The match keys [<= len(subs) k] of the first k relations of match keys `subs`
        (unknown keys: none)."""
        if len(self.keys) == 0 or k == 0:
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, subs), len(self.keys) - 1)
        hit = pos[self.keys[pos] == subs]
        out = self.table[hit, :k].ravel()
        return out[out != 0]


def _interests(rng: np.random.Generator, live_rows: np.ndarray, subcategory: np.ndarray) -> np.ndarray | None:
    """The live rows of 1-3 random subcategories (`subcategory` [L] of live_rows, 0 unknown) that
    hold at least 10 news: a pseudo-user's interests; None where no subcategory does."""
    kinds, counts = np.unique(subcategory[subcategory != 0], return_counts=True)
    kinds = kinds[counts >= 10]
    if len(kinds) == 0:
        return None
    pick = rng.choice(kinds, min(len(kinds), int(rng.integers(1, 4))), replace=False)
    within = live_rows[np.isin(subcategory, pick)]
    return within if len(within) >= 20 else None


def _mixed_clicks(
    rng: np.random.Generator, live_rows: np.ndarray, subcategory: np.ndarray | None, size: int
) -> np.ndarray:
    """`size` distinct live rows in random order: half from 1-3 random subcategories
    (`_interests`; `subcategory` [L] of live_rows, None: none known), the rest anywhere."""
    within = None if subcategory is None else _interests(rng, live_rows, subcategory)
    own = (
        np.zeros(0, np.int64)
        if within is None
        else rng.choice(within, min(size // 2, len(within) // 2), replace=False)
    )
    drawn = rng.choice(live_rows, min(len(live_rows), size + len(own)), replace=False)
    hist = np.concatenate([own, drawn[~np.isin(drawn, own)][: size - len(own)]])
    return hist[rng.permutation(len(hist))]


def _match_of(match: np.ndarray | None, cand: np.ndarray, hist: np.ndarray) -> tuple:
    return () if match is None else (take(match, cand), match[hist])


class ExactIndex:
    """Exhaustive inner-product search over vectors held in a growable array (capacity doubles):
    one torch matmul and `topk`, which beat faiss's IndexFlatIP at the k the gather asks for
    (51 queries, k = 250, 2 cores: 7k news 10.4 -> 3.1 ms, 34k 55 -> 11 ms, 50k 88 -> 16 ms; the
    same neighbours). The faiss-like part of the interface the `Retriever` uses.

    int8: the products are taken over `quantize`d copies of the vectors and queries, as the
    larger pools' 8-bit scalar quantiser does, a quarter of the bytes (17 queries over 34k news,
    cold cache: 10.7-11.2 -> 4.4 ms); the search is then no longer exact."""

    def __init__(self, dim: int, int8: bool = False) -> None:
        self.x = np.zeros((1024, dim), np.float32)
        self.codes = np.zeros((1024 if int8 else 0, dim + SCALE_BYTES), np.int8)
        self.int8, self.ntotal = int8, 0

    def add(self, vectors: np.ndarray) -> None:
        n = self.ntotal + len(vectors)
        if n > len(self.x):
            grown = np.zeros((max(n, 2 * len(self.x)), self.x.shape[1]), np.float32)
            grown[: self.ntotal] = self.x[: self.ntotal]
            self.x = grown
            if self.int8:
                codes = np.zeros((len(grown), self.codes.shape[1]), np.int8)
                codes[: self.ntotal] = self.codes[: self.ntotal]
                self.codes = codes
        self.x[self.ntotal : n] = vectors
        if self.int8:
            self.codes[self.ntotal : n] = quantize(vectors)
        self.ntotal = n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> the inner products and positions [Q, k] of each query's k best (k <= ntotal)."""
        if self.int8:
            x = Codes.of(torch.from_numpy(self.codes[: self.ntotal]))
            scores = pair_cosines(x, Codes.of(torch.from_numpy(quantize(queries)))).T  # [Q, N]
        else:
            scores = torch.from_numpy(queries) @ torch.from_numpy(self.x[: self.ntotal]).T  # [Q, N]
        best = torch.topk(scores, k, dim=1)
        return best.values.numpy(), best.indices.numpy()

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self.x[start : start + n].copy()

    def nbytes(self) -> int:
        return int(self.ntotal * (self.x.shape[1] * 4 + self.int8 * self.codes.shape[1]))


class Retriever:
    """An ANN index over store rows 1..N (index position = row - 1), safe to search while news
    are added (one lock: faiss indexes do not allow both at once)."""

    def __init__(self, vectors: np.ndarray, cfg: RetrievalConfig | None = None) -> None:
        """vectors [N, D]: retrieval vectors of store rows 1..N, in row order."""
        import faiss  # the serve extra

        self.faiss = faiss
        self.cfg = cfg or RetrievalConfig()
        self.dim = int(vectors.shape[1])
        self.lock = threading.Lock()
        self.index = self._build(np.ascontiguousarray(vectors, dtype=np.float32))
        self.related: Related | None = None  # set when the proxy is calibrated (eq. 8f models)

    @property
    def kind(self) -> str:
        if isinstance(self.index, ExactIndex):
            return "flat-int8" if self.index.int8 else "exact"
        return "ivf-sq8"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _build(self, vectors: np.ndarray):
        faiss, n = self.faiss, len(vectors)
        if n < self.cfg.exact_below:
            index = ExactIndex(self.dim, self.cfg.flat_int8)
        else:
            nlist = int(self.cfg.lists_per_sqrt * np.sqrt(n))
            quantizer = faiss.IndexFlatIP(self.dim)
            qt = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, qt, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = vectors[np.sort(rng.choice(n, min(n, self.cfg.train_sample), replace=False))]
            index.train(sample)
            index.nprobe = self.cfg.nprobe
        if n:
            index.add(vectors)
        return index

    def add(self, vectors: np.ndarray) -> None:
        """Append the retrieval vectors [n, D] of the next store rows."""
        if len(vectors) == 0:
            return
        with self.lock:
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            if isinstance(self.index, ExactIndex) and self.index.ntotal >= 2 * self.cfg.exact_below:
                everything = self.index.reconstruct_n(0, self.index.ntotal)
                self.index = self._build(everything)

    def memory_bytes(self) -> int:
        """The index's serialised size: about what it holds in memory."""
        with self.lock:
            if isinstance(self.index, ExactIndex):
                return self.index.nbytes()
            return int(self.faiss.serialize_index(self.index).size)

    def nearest(self, clicks: np.ndarray, hist_rows: np.ndarray, live: np.ndarray) -> np.ndarray:
        """Step 1 (gather): the `per_query` nearest live news of each query, merged round-robin
        (the mean's nearest, then each interest's, from the most recent click's, or each click's
        from the most recent; repeats dropped). Arguments: see `near_rows`."""
        order = self.near_rows(clicks, hist_rows, live)
        _, first = np.unique(order, return_index=True)
        return order[np.sort(first)]

    def near_rows(self, clicks: np.ndarray, hist_rows: np.ndarray, live: np.ndarray) -> np.ndarray:
        """`nearest` with its repeats [<= Q per_query], for a caller that drops them itself
        (`gather`'s union: dropping them in order here took half a millisecond of 1M news'
        gathering, 7,600 rows).

        clicks [M, D]: the retrieval vectors of the user's clicks `hist_rows` [M], oldest first
        (the clicks are excluded from the answer); live [n] bool: the rows that are the current
        version of their news in the request's snapshot (rows >= n are not in it yet)."""
        if len(clicks) == 0 or len(self) == 0:
            return np.zeros(0, np.int64)
        mean = clicks.mean(0, keepdims=True)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        recent = clicks[-self.cfg.queries :][::-1]
        if self.cfg.interests:
            recent = interests(recent, self.cfg.interests)
        queries = np.ascontiguousarray(np.concatenate([mean, recent]), dtype=np.float32)  # [Q, D]
        want = min(self.cfg.per_query + len(hist_rows), len(self))  # room for the dropped clicks
        with self.lock:
            _, pos = self.index.search(queries, want)  # [Q, want]
        rows = pos + 1  # -1 (no result) -> 0 (the null row)
        ok = (rows > 0) & (rows < len(live))
        ok[ok] = live[rows[ok]]
        clicked = np.sort(hist_rows)  # the clicks, by binary search (np.isin: 5x slower here)
        if len(clicked):
            ok &= clicked[np.minimum(np.searchsorted(clicked, rows), len(clicked) - 1)] != rows
        ok &= np.cumsum(ok, axis=1) <= self.cfg.per_query  # each query's first per_query
        return rows.T[ok.T].astype(np.int64)  # rank-major: round-robin over the queries


def interests(clicks: np.ndarray, k: int, iters: int = 4) -> np.ndarray:
    """Up to k unit centroids [<= k, D] of unit vectors clicks [M, D] (most recent first), by
    spherical k-means seeded farthest-first from the most recent click (deterministic): the
    user's interests, searched in place of each click. Fewer clicks than k: the clicks."""
    if len(clicks) <= k:
        return clicks
    # numpy on these small arrays, torch for the products (see `cosine_features`): a fifth of
    # the torch-only version's ~40 small-tensor calls' overhead (50 clicks: 0.47 -> 0.32 ms)
    xt = torch.from_numpy(np.array(clicks, dtype=np.float32))  # a copy: clicks may be a reversed view
    x = xt.numpy()
    sims = (xt @ xt.T).numpy()  # [M, M]
    chosen, nearest = [0], sims[0].copy()
    for _ in range(k - 1):
        i = int(np.argmin(nearest))
        chosen.append(i)
        np.maximum(nearest, sims[i], out=nearest)
    c = x[chosen]
    ids = np.arange(k)[:, None]
    for _ in range(iters):
        assign = (xt @ torch.from_numpy(c).T).numpy().argmax(1)  # [M]
        member = assign[None, :] == ids[: len(c)]  # [k, M]
        c = (torch.from_numpy(member.astype(np.float32)) @ xt).numpy()[
            member.any(1)
        ]  # an emptied centroid is dropped
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c


def gather(
    retriever: Retriever,
    vectors: Callable[[np.ndarray], np.ndarray],
    best_prior: np.ndarray | None,
    hist_rows: np.ndarray,
    live: np.ndarray,
    shared: np.ndarray | None = None,
) -> np.ndarray:
    """Step 1 for one user: the gathered rows [G], ascending, the clicks left out: the news
    nearest the clicks (`Retriever.near_rows`), the `prior_pool` best-prior ones and `shared`.

    vectors(rows) -> the retrieval vectors [len(rows), D] of rows; best_prior: live rows by
    descending prior (None: none); hist_rows [M] the clicks, oldest first; live [n] bool (see
    `Retriever.near_rows`); shared: live rows that share a field with the clicks (`sharing`)."""
    cfg = retriever.cfg
    parts = [retriever.near_rows(vectors(hist_rows), hist_rows, live)]  # the clicks left out
    if best_prior is not None:
        parts.append(best_prior[~np.isin(best_prior, hist_rows)][: cfg.prior_pool])
    if shared is not None and len(shared):
        parts.append(shared)
    return union(parts, len(live), np.asarray(hist_rows, np.int64))  # [G]


def proxy_features(
    cfg: RetrievalConfig,
    vectors: Callable[[np.ndarray], np.ndarray],
    cand: np.ndarray,
    hist_rows: np.ndarray,
    match: np.ndarray | None = None,
) -> np.ndarray:
    """The cheap proxy's features [G, F] of rows cand [G] for the clicks hist_rows [M] (oldest
    first; the last `max_history` read; vectors(rows): arrays or tensors, see `cosine_features`):
    `cosine_features` (the model's side-path ones follow in `retrieve`, for the first cut only)."""
    hist = hist_rows[-cfg.max_history :]
    return cosine_features(vectors(cand), vectors(hist), cfg.recent, *_match_of(match, cand, hist))


def first_cut(
    cfg: RetrievalConfig, cand: np.ndarray, prior: np.ndarray, features: np.ndarray, content: Content
) -> np.ndarray:
    """Positions [<= first_cut] of the gathered rows cand [G] that the model's side-path features
    are computed for: the `first_cut` best by the cheap proxy (prior [G] + `cosine_features`
    [G, F] @ `first_weights`), in row order; all of them without side paths, without cheap
    weights (not calibrated) or when G is at most `first_cut`. The side paths cost about 3.5 ms
    per 1,000 news (the default model), and G grows with the pool (about 3,600 at 34k news,
    11,000 at 1M): the cut bounds their cost at any pool size. Recall@200 of the exact top-10
    (150 users) against no cut: story 34k 0.967 (0.970), drift 34k 0.971 (0.970), drift and
    entity 7k 1.000 (1.000); a cut at 1,000 lost story's (0.912): its model leans on the side
    paths (docs/benchmarks.md)."""
    G = len(cand)
    if content is None or not cfg.first_cut or not cfg.first_weights or G <= cfg.first_cut:
        return np.arange(G)
    return np.sort(shortlist(np.arange(G), prior, features, cfg.first_weights, cfg.first_cut))


def second_cut(
    cfg: RetrievalConfig,
    cand: np.ndarray,
    prior: np.ndarray,
    features: np.ndarray,
    early: Content,
    hist: np.ndarray,
    at_least: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions [<= second_cut] of the first cut's rows cand [G'] that the rest of the model's
    side-path features are computed for: the `second_cut` best by the cheap proxy and the
    features `early` gives alone (eq. 8''''', prior [G'] + [cosine_features, early] @
    `second_weights`), in row order, and those early features of them [<= second_cut, e]; all of
    them and None without early features or their weights, or when G' is at most `second_cut`
    (or at_least, the rows the caller returns: a cut never leaves fewer). Eq. 8''''' costs about a third of the side paths, whose
    rest then runs on a quarter of the news. Story data (34k news, 200 users, weights fitted
    on half, recall@200 of the exact top-10 on the other): the same 0.973 as without this cut
    at 300 to 1,000 news after a first cut of 2,000, where a first cut of 1,250 alone fell to
    0.85: the story model leans on eq. 8''''', which the cheap proxy lacks (docs/benchmarks.md)."""
    G, size = len(cand), max(cfg.second_cut, at_least)
    if early is None or not cfg.second_cut or not cfg.second_weights or G <= size:
        return np.arange(G), None
    e = early(cand, hist).astype(features.dtype)  # [G', e]
    keep = np.sort(shortlist(np.arange(G), prior, np.concatenate([features, e], 1), cfg.second_weights, size))
    return keep, e[keep]


def second_cut_keeps(
    cfg: RetrievalConfig, X: np.ndarray, y: np.ndarray, prior: np.ndarray, users: list[int], early: list[int]
) -> tuple[float, float]:
    """How much of the exact top-10 of calibration's pseudo-users the proxy's top `top_n`
    holds without a second cut and with it (`cfg`'s weights; X [S, F + 1] `calibration_set`'s
    features of each pseudo-user's gathered news, a constant last; y [S] their score - prior;
    prior [S]; users: each pseudo-user's row count, in X's order; early: the cheap and early
    columns the second cut reads). The second cut serves only where it keeps as much: a model
    whose side paths other than eq. 8''''' carry its ranking loses with it (planted drift data,
    7k news, 150 real users: recall@200 0.991 with it off, 0.932 on)."""
    cheap, late = len(cfg.first_weights), early[len(cfg.first_weights) :]
    got = np.zeros(2)
    for rows in np.split(np.arange(len(y)), np.cumsum(users)[:-1]):
        if len(rows) == 0:
            continue
        x, p = X[rows, :-1], prior[rows]  # the cuts below as `retrieve_side` makes them
        top = np.argsort(-(y[rows] + p), kind="stable")[:10]
        keep = first_cut(cfg, np.arange(len(rows)), p, x[:, :cheap], lambda *_: None)
        for i, on in enumerate((False, True)):
            k = keep
            if on:
                k = k[
                    second_cut(cfg, k, p[k], x[k][:, :cheap], lambda cand, _, x=x: x[cand][:, late], None)[0]
                ]
            final = k[best_positions(p[k], x[k], cfg.weights, cfg.top_n)]
            got[i] += np.isin(top, final).mean()
    n = max(1, sum(1 for u in users if u))
    return got[0] / n, got[1] / n


def retrieve(*args, **kwargs) -> np.ndarray:
    """The rows of `retrieve_side` (its arguments) alone."""
    return retrieve_side(*args, **kwargs)[0]


def retrieve_side(
    retriever: Retriever,
    vectors: Callable[[np.ndarray], np.ndarray],
    prior: np.ndarray | None,
    best_prior: np.ndarray | None,
    hist_rows: np.ndarray,
    live: np.ndarray,
    k: int = 0,
    match: np.ndarray | None = None,
    content: Content = None,
    shared: np.ndarray | None = None,
    unit: Callable[[np.ndarray], np.ndarray | torch.Tensor] | None = None,
    early: Content = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Both steps for one user: rows [<= k], best proxy first, the clicks left out (`gather`,
    then `shortlist` by the `proxy_features`, the side-path ones only for the `first_cut`, all
    but eq. 8''''' only for the `second_cut` of those where it serves), and
    the model's side-path features [<= k, k'] of those rows as `content` gave them (None
    without content), for the re-ranker to read instead of computing them again. prior [n] by
    row (None: 0); match [n, F]: match ids by row, or None; content: the model's side-path
    features (see `with_content`), or None; unit(rows): the vectors the proxy reads (the int8
    copies of `proxy_arrays`; None: `vectors`); early: the columns of content's features it
    gives alone, cheaper (`second_cut`), or None."""
    cfg = retriever.cfg
    gathered = gather(retriever, vectors, best_prior, hist_rows, live, shared)
    p = np.zeros(len(gathered)) if prior is None else prior[gathered]
    features = proxy_features(cfg, unit or vectors, gathered, hist_rows, match)
    keep = first_cut(cfg, gathered, p, features, content)
    gathered, p, features = gathered[keep], p[keep], features[keep]
    hist = hist_rows[-cfg.max_history :]
    keep, given = second_cut(cfg, gathered, p, features, early, hist, k or cfg.top_n)
    gathered, p, features = gathered[keep], p[keep], features[keep]
    side = None
    if content is not None:  # (the early columns as the second cut computed them)
        side = (content(gathered, hist) if given is None else content(gathered, hist, given)).astype(
            features.dtype
        )
    if side is not None:
        features = np.concatenate([features, side], 1)
    best = best_positions(p, features, cfg.weights, k or cfg.top_n)
    return gathered[best], None if side is None else side[best]
