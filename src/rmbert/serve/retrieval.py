"""The retrieval stage of two-stage ranking: candidates from the whole live pool, then re-ranking.

A `/rank` request without candidates is ranked against every live news in the store, not just
the freshest few: an ANN index (faiss) returns the `top_n` news closest to the user, and the
recommender re-ranks those.

The choice of user vector. RMBERT scores a (user, candidate) pair through p reasoning steps
whose attention depends on the candidate, so no single user vector reproduces its score. The
retrieval space is instead the one the default model's click layer already reads: eq. 8''' of
`models/rmbert.py` hands it the max and mean cosine of the candidate to the clicked news in the
learned metric S (head 0). Retrieval therefore runs one query per recent click (the max-cosine
term: a candidate close to any one click) and one with their normalised mean (the mean-cosine
term), and merges the ranked lists round-robin. A model without eq. 8''' uses its news vectors
(unit x_n) the same way. No extra head is trained: the space comes from the same run, and
`benchmarks/retrieval.py` measures what it costs, as the recall of the exact top-10 of
exhaustive scoring over the whole pool.

Index. Pools below `exact_below` news are searched exhaustively (IndexFlatIP); larger ones
with an inverted file over 8-bit scalar-quantised vectors (IndexIVFScalarQuantizer, nlist about
sqrt(n), `nprobe` lists per query), trained once on a sample. Fresh news are added to the index
as they reach the serving index (no rebuild, no retraining); an exact index that outgrows
`exact_below` twice over is rebuilt as an inverted file once. Index position i holds store row
i + 1, so the index and the serving rows grow together; a row replaced by a later version of its
news (an update) stays in the index but is filtered out, as are rows the request's snapshot does
not have yet. A restart rebuilds the index from the store, so it always matches the store.

Shape letters: N news in the index, Q queries, D the vector width.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievalConfig:
    top_n: int = 200  # news handed to the re-ranker (0 = no retrieval: the freshest news instead)
    queries: int = 8  # the most recent clicks searched one by one, besides their mean
    exact_below: int = 50_000  # smaller pools are searched exhaustively
    nprobe: int = 24  # inverted lists visited per query (larger pools)
    train_sample: int = 65_536  # news the inverted file's centroids and quantiser are fitted on

    def __post_init__(self) -> None:
        for name in ("top_n", "queries", "exact_below", "nprobe", "train_sample"):
            if getattr(self, name) < (0 if name == "top_n" else 1):
                raise ValueError(f"retrieval.{name} is out of range: {getattr(self, name)}")


def retrieval_vectors(arrays: dict[str, np.ndarray], rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """Unit vectors [n, D] float32 of the retrieval space for serving-array `rows`: the model's
    metric head 0 (`sim`, eq. 8''') where it has one, else the unit news vectors."""
    if "sim" in arrays:
        return np.ascontiguousarray(np.asarray(arrays["sim"][rows])[:, 0], dtype=np.float32)
    x = np.asarray(arrays["cls"][rows], dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


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

    @property
    def kind(self) -> str:
        return "exact" if isinstance(self.index, self.faiss.IndexFlat) else "ivf-sq8"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _build(self, vectors: np.ndarray):
        faiss, n = self.faiss, len(vectors)
        if n < self.cfg.exact_below:
            index = faiss.IndexFlatIP(self.dim)
        else:
            nlist = int(np.sqrt(n))
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
            if self.kind == "exact" and self.index.ntotal >= 2 * self.cfg.exact_below:
                everything = self.index.reconstruct_n(0, self.index.ntotal)
                self.index = self._build(everything)

    def memory_bytes(self) -> int:
        """The index's serialised size: about what it holds in memory."""
        with self.lock:
            return int(self.faiss.serialize_index(self.index).size)

    def search(self, clicks: np.ndarray, hist_rows: np.ndarray, live: np.ndarray, k: int = 0) -> np.ndarray:
        """Store rows [<= k] of the live news closest to a user, best first.

        clicks [h, D]: the retrieval vectors of the user's clicks `hist_rows` [h], oldest first
        (the clicks are excluded from the answer); live [n] bool: the rows that are the current
        version of their news in the request's snapshot (rows >= n are not in it yet)."""
        k = k or self.cfg.top_n
        if len(clicks) == 0 or len(self) == 0:
            return np.zeros(0, np.int64)  # nothing to retrieve by: the caller falls back
        mean = clicks.mean(0, keepdims=True)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        recent = clicks[-self.cfg.queries :][::-1]  # the most recent first
        queries = np.ascontiguousarray(np.concatenate([mean, recent]), dtype=np.float32)  # [Q, D]
        want = min(k + len(hist_rows), len(self))  # room for the clicks, which are dropped below
        with self.lock:
            _, pos = self.index.search(queries, want)  # [Q, want]
        rows = pos + 1  # -1 (no result) -> 0 (the null row)
        ok = (rows > 0) & (rows < len(live))
        ok[ok] &= live[rows[ok]]
        ok[ok] &= ~np.isin(rows[ok], hist_rows)
        # round-robin over the queries' ranked lists: the mean's best, then each click's best, ...
        order = rows.T[ok.T]  # rank-major
        _, first = np.unique(order, return_index=True)
        return order[np.sort(first)][:k].astype(np.int64)
