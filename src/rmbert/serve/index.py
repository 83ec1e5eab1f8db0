"""In-memory view of a news store for serving: immutable snapshots, cheap appends.

Rows live in growable arrays (capacity doubles), so appending n news costs O(n) amortised.
Each request reads one `Snapshot` (an atomic reference), so a concurrent append never
shows it a half-updated index: rows below a snapshot's `n` are never modified. A snapshot
also views its arrays as torch tensors, so a batch is gathered with one `index_select`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rmbert.encoders.store import NewsStore
from rmbert.serve.retrieval import (
    Codes,
    FieldLists,
    ReaderPrior,
    Related,
    RetrievalConfig,
    Retriever,
    calibration_set,
    gather,
    least_squares,
    proxy_arrays,
    proxy_rows,
    retrieval_vectors,
    retrieve_side,
    second_cut_keeps,
    sharing,
)

log = logging.getLogger(__name__)


class Rows:
    """Arrays that grow along axis 0 (capacity doubling)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        self.n = n
        self.data = {k: np.array(v) for k, v in arrays.items()}  # in memory, writable

    def append(self, new: dict[str, np.ndarray]) -> None:
        m = len(next(iter(new.values())))
        cap = len(next(iter(self.data.values())))
        if self.n + m > cap:
            size = max(self.n + m, 2 * cap)
            grown = {}
            for k, v in self.data.items():
                g = np.zeros((size, *v.shape[1:]), dtype=v.dtype)
                g[: self.n] = v[: self.n]
                grown[k] = g
            self.data = grown  # readers holding the old dict keep reading the old arrays
        for k, v in new.items():
            self.data[k][self.n : self.n + m] = v
        self.n += m


@dataclass(frozen=True)
class Snapshot:
    n: int
    arrays: dict[str, np.ndarray]
    index: dict[str, int]  # id -> latest row
    info: list[dict]  # per row (row 0 = null)
    fresh: np.ndarray  # live rows, most recently added first
    live: np.ndarray  # [n] bool: the row is the current version of its news
    tensors: dict[str, torch.Tensor]  # the arrays, viewed (not copied) as tensors
    retriever: Retriever | None = None  # the ANN index over the rows (it may hold rows >= n)
    best_prior: np.ndarray | None = None  # live rows with the best candidate-only prior, best first
    content: Callable | None = None  # the model's side-path features (arrays, rows, clicks) -> [G, k]
    fields: FieldLists | None = None  # rows by entity, by subcategory (a model with "match")

    def retrieve(self, hist_rows: np.ndarray, k: int = 0) -> np.ndarray | None:
        """A user's candidates from the whole live pool, best proxy first (serve/retrieval.py):
        the news nearest the clicks and those with the best prior, shortlisted by the proxy
        score. hist_rows: the clicks, oldest first (left out of the answer). A user without
        clicks gets the news with the best prior. None without retrieval."""
        return self.retrieve_side(hist_rows, k)[0]

    def retrieve_side(self, hist_rows: np.ndarray, k: int = 0) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`retrieve`, and the model's side-path features of the rows it returns (the proxy's,
        `retrieval.retrieve_side`; None without them), which the re-ranker reads."""
        if self.retriever is None:
            return None, None
        if len(hist_rows) == 0:
            return None if self.best_prior is None else self.best_prior[: k or self.retriever.cfg.top_n], None
        return retrieve_side(
            self.retriever,
            self.vectors,
            self.arrays.get("prior"),
            self.best_prior,
            hist_rows,
            self.live,
            k,
            self.arrays.get("match"),
            self.side,
            self.shared(hist_rows),
            self.unit,
            self.early,
        )

    def gather(self, hist_rows: np.ndarray) -> np.ndarray:
        """Retrieval's step 1 for clicks hist_rows [M] (M >= 1, oldest first): the live rows [G]
        the shortlist ranks, ascending, the clicks left out (`retrieval.gather`)."""
        return gather(
            self.retriever, self.vectors, self.best_prior, hist_rows, self.live, self.shared(hist_rows)
        )

    def shared(self, hist_rows: np.ndarray) -> np.ndarray | None:
        """The live rows sharing a field with the clicks (`retrieval.sharing`), None without field lists."""
        if self.fields is None:
            return None
        cfg = self.retriever.cfg
        return sharing(self.fields, self.arrays["match"], self.live, hist_rows, cfg, self.retriever.related)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The retrieval vectors [len(rows), D] of rows."""
        return retrieval_vectors(self.arrays, rows)

    def unit(self, rows: np.ndarray) -> np.ndarray | torch.Tensor | Codes:
        """The vectors the retrieval proxy reads of rows: the int8 copies (`proxy_arrays`)."""
        if "unit8" in self.arrays:
            return proxy_rows(self.arrays["unit8"], rows)
        return self.vectors(rows)

    @property
    def side(self) -> Callable[..., np.ndarray] | None:
        """(rows, clicks[, given]) -> the model's side-path features of the proxy [G, k]
        (`content`; given: its `early_columns`, already computed), or None."""
        content = self.content
        if content is None:
            return None
        return lambda rows, hist, given=None: content(self.arrays, rows, hist, given=given)

    @property
    def early(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """(rows, clicks) -> the columns `early_columns` of `side`'s alone [G, e] (the second
        cut's: serve/retrieval.py), or None for a model without such."""
        content = self.content
        if not self.early_columns:
            return None
        return lambda rows, hist: content(self.arrays, rows, hist, early=True)

    @property
    def early_columns(self) -> tuple[int, ...]:
        """The columns of `side`'s features that `early` gives alone (none: ())."""
        return getattr(self.content, "early_columns", ()) if self.content is not None else ()


BASE = ("cls", "pool", "tokens", "mask", "input_ids", "attn")


def _base(store: NewsStore, first: int = 0) -> dict[str, np.ndarray]:
    return {k: np.asarray(store.arrays[k][first:]) for k in BASE}


class ServingIndex:
    """`prepare({cls, pool, tokens, mask, input_ids, attn} of n news, their n info dicts, their n ids)
    -> {name: [n, ...]}` adds per-news arrays (a model's precomputed news terms) or replaces some (the news vectors a
    model reads: pooled, standardised, with features)."""

    def __init__(
        self,
        store: NewsStore,
        prepare=None,
        retrieval: RetrievalConfig | None = None,
        content: Callable | None = None,
        affinity: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """`content(arrays, rows, clicks) -> [G, k]`: a model's side-path features for the
        retrieval proxy (`Ranker.content_proxy`), or None; `affinity`: a model's learned
        subcategory affinity and its ids' match keys (`Ranker.subcategory_affinity`), or None."""
        self.prepare = prepare or (lambda arrays, info, ids: {})
        self.content, self.affinity = content, affinity
        self.related: Related | None = None  # from the affinity, once the proxy is calibrated
        self.lock = threading.Lock()  # serialises appends; reads never wait
        self.retrieval = retrieval if retrieval is not None and retrieval.top_n > 0 else None
        self.retriever: Retriever | None = None  # over every row, kept in step with the rows
        self.fields: FieldLists | None = None  # the listed part rebuilt only when stale
        # orders the subcategory lists (the rows' "within"), once calibrated
        self.readers: ReaderPrior | None = None
        # scores rows for clicks through the model as served (snapshot, hist_rows, cand_rows) -> [C]:
        # the news added later get reader priors too (set once serving starts: the worker's queue)
        self.score_added: Callable[[Snapshot, np.ndarray, np.ndarray], np.ndarray] | None = None
        self._load(store)

    def _load(self, store: NewsStore) -> None:
        self.store = store
        self.info = [{}] + list(store.info)
        base = _base(store)
        arrays = {**base, **self.prepare(base, self.info, ["", *store.ids])}
        if self.retrieval is not None:
            arrays |= proxy_arrays(arrays)
        self.rows = Rows(arrays)
        if self.retrieval is not None:
            self.retriever = Retriever(
                retrieval_vectors(self.rows.data, slice(1, self.rows.n)), self.retrieval
            )
            self.retriever.related = self.related
        self.index = dict(store.index)
        self.fields, self.readers = None, None  # a rebuilt store: lists in the prior's order
        self.snapshot = self._snap()

    def calibrate(self, score) -> tuple[float, ...] | None:
        """Fit the retrieval proxy's weights to the model, `score(hist_rows, cand_rows)` ->
        scores (serve/retrieval.py), in three steps: a first fit on pseudo-users' random and
        near news, which orients the related subcategories (`Related`); the subcategory lists'
        reader order (`ReaderPrior`); then the final fit on what the shortlist ranks, the news
        step 1 gathers for each pseudo-user. None without retrieval."""
        if self.retriever is None or "prior" not in self.snapshot.arrays:
            return None
        store = self.store
        weights = self._fit(self.snapshot, score, gathered=False)[0]
        with self.lock:
            self._use(weights)
            if self.affinity is not None:
                self.related = Related.build(*self.affinity, weights, self.retrieval.related)
                self.retriever.related = self.related
        snap = self.snapshot
        if "match" in snap.arrays and self.retrieval.readers:
            match, prior = snap.arrays["match"][: snap.n], snap.arrays["prior"][: snap.n]
            readers = ReaderPrior.build(
                match[:, 1], np.flatnonzero(snap.live), prior, score, self.retrieval.readers
            )
            with self.lock:
                if self.store.meta.get("uid") != store.meta.get("uid"):  # rebuilt meanwhile: not its rows
                    return weights
                self.readers, self.fields = readers, None  # the lists rebuilt in the new order
                data, n = self.rows.data, self.rows.n
                within = np.zeros(len(data["prior"]))  # the rows' capacity, as every array of rows
                within[:n] = readers.order(data["prior"][:n], data["match"][:n, 1])
                data["within"] = within
                self.snapshot = self._snap()
        weights, first, second = self._fit(self.snapshot, score, gathered=True)
        with self.lock:
            self._use(weights, first, second)
        return weights

    def _fit(self, snap: Snapshot, score, gathered: bool) -> tuple[tuple[float, ...], ...]:
        """The proxy's weights and, for a model with side-path features, the first cut's cheap
        proxy's and the second cut's (the cheap features and `Snapshot.early`'s), fitted on the
        same pseudo-users (`retrieval.calibration_set` on snapshot snap; `gathered`: on the news
        its step 1 gathers)."""
        match = snap.arrays["match"][: snap.n] if "match" in snap.arrays else None
        rows: list[np.ndarray] = []
        X, y = calibration_set(
            snap.unit,  # by row, not the pool's copied whole; the proxy's copies, as served
            snap.arrays["prior"][: snap.n],
            np.flatnonzero(snap.live),
            score,
            recent=self.retrieval.recent,
            match=match,
            content=snap.side,
            gather=snap.gather if gathered else None,
            rows_out=rows,
        )
        cheap = 4 if match is None else 10  # the `cosine_features` columns, before the side paths'
        if snap.side is None or not len(X):
            return least_squares(X, y), (), ()
        weights, first = least_squares(X, y), least_squares(X, y, cheap)
        early = [*range(cheap), *(cheap + c for c in snap.early_columns)]
        cuts = self.retrieval.second_cut and (
            not self.retrieval.first_cut or self.retrieval.second_cut < self.retrieval.first_cut
        )
        second = least_squares(X, y, early) if len(early) > cheap and gathered and cuts else ()
        if second:  # served only where the pseudo-users' top-10 keep as much with it
            cfg = dataclasses.replace(
                self.retrieval, weights=weights, first_weights=first, second_weights=second
            )
            prior = snap.arrays["prior"][np.concatenate(rows)]
            off, on = second_cut_keeps(cfg, X, y, prior, [len(r) for r in rows], early)
            log.info("second cut: the pseudo-users' top-10 kept %.3f without, %.3f with", off, on)
            if on < off - 0.005:
                second = ()
        return weights, first, second

    def _use(
        self, weights: tuple[float, ...], first: tuple[float, ...] = (), second: tuple[float, ...] = ()
    ) -> None:
        """Serve with proxy weights w and the first and second cuts' (call with the lock held)."""
        self.retrieval = dataclasses.replace(
            self.retrieval, weights=weights, first_weights=first, second_weights=second
        )
        self.retriever.cfg = self.retrieval

    def refresh(self) -> int:
        """Take in the segments other writers (`rmbert encode`, another server) committed since
        this index last looked; returns how many rows were added."""
        with self.lock:
            return self.update(self.store.refresh())

    def update(self, new: NewsStore) -> int:
        """Move to `new`, a later state of this index's store (call with the lock held)."""
        if new is self.store:
            return 0
        have = len(self.store)
        if new.meta.get("uid") != self.store.meta.get("uid") or len(new) < have:
            self._load(new)  # the store was rebuilt: read it afresh
            return len(new)
        self.add(new, have)
        return len(new) - have

    def _snap(self) -> Snapshot:
        live = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        added = np.array([self.info[r].get("added", 0.0) for r in live])
        fresh = live[np.lexsort((-live, -added))]
        is_live = np.zeros(self.rows.n, bool)
        is_live[live] = True
        arrays = dict(self.rows.data)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        info, index = list(self.info), dict(self.index)
        best = None
        if self.retriever is not None and "prior" in arrays and len(live):
            prior = arrays["prior"][live]
            k = min(len(live), self.retriever.cfg.prior_pool + 512)  # room for a user's clicks
            top = np.argpartition(-prior, k - 1)[:k]
            best = live[top[np.argsort(-prior[top], kind="stable")]]
        fields = self._fields(arrays, is_live)
        return Snapshot(
            self.rows.n,
            arrays,
            index,
            info,
            fresh,
            is_live,
            tensors,
            self.retriever,
            best,
            self.content,
            fields,
        )

    def _fields(self, arrays: dict[str, np.ndarray], live: np.ndarray) -> FieldLists | None:
        """The field lists of the gather step (serve/retrieval.py): the listed part kept until
        stale, the tail rebuilt."""
        if self.retriever is None or "match" not in arrays or "prior" not in arrays:
            return None
        n = len(live)
        relist = self.retriever.cfg.relist_after
        within = arrays["within"][:n] if "within" in arrays else None
        self.fields = FieldLists.build(
            arrays["match"][:n], live, arrays["prior"][:n], self.fields, relist, within
        )
        return self.fields

    def _reader_scores(self, first: int) -> None:
        """Order rows first.. (appended, not yet published) in their subcategory lists by their
        `ReaderPrior.score`, where their subcategory has readers; the rest keep prior + offset."""
        data, n = self.rows.data, self.rows.n
        snap = dataclasses.replace(  # the rows so far, for the scorer only
            self.snapshot,
            n=n,
            arrays=dict(data),
            tensors={k: torch.from_numpy(v) for k, v in data.items()},
            info=list(self.info),
        )
        rows = np.arange(first, n)
        try:
            values = self.readers.score(
                rows, data["match"][first:n, 1], lambda hist, cand: self.score_added(snap, hist, cand)
            )
        except Exception as e:  # the worker is busy or failed: these rows keep prior + offset
            log.warning("reader priors of %d added news not computed (%s): prior + offset", len(rows), e)
            return
        has = ~np.isnan(values)
        data["within"][rows[has]] = values[has]

    def add(self, store: NewsStore, first_new: int) -> None:
        """Take rows [first_new:] of the (re-opened) store into memory and publish a new snapshot."""
        new = _base(store, first_new + 1)
        new.update(self.prepare(new, store.info[first_new:], store.ids[first_new:]))
        if self.retrieval is not None:
            new.update(proxy_arrays(new))
        if self.readers is not None and "within" in self.rows.data:
            new["within"] = self.readers.order(new["prior"], new["match"][:, 1], first_new + 1)
        self.rows.append(new)
        if self.retriever is not None:
            self.retriever.add(retrieval_vectors(new))
        for r, nid in enumerate(store.ids[first_new:], start=first_new + 1):
            self.index[nid] = r
        self.info += store.info[first_new:]
        self.store = store
        if self.readers is not None and self.score_added is not None and "within" in self.rows.data:
            self._reader_scores(first_new + 1)  # before the rows are published
        self.snapshot = self._snap()
