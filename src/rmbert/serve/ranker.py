"""The batching inference worker: concurrent /rank requests scored together in one forward."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rmbert.beyond import mmr_order
from rmbert.models.tables import ServingSource, match_key, serving_tables
from rmbert.run import LoadedRun
from rmbert.serve import explain
from rmbert.serve.index import Snapshot
from rmbert.serve.retrieval import head_cosines, take
from rmbert.types import NewsRepr


class Busy(Exception):
    """The worker's queue is full, or a request waited longer than the queue timeout."""


@dataclass
class Job:
    """One /rank request waiting for the inference worker; `settle(result, error)` is called once."""

    snap: Snapshot
    hist_rows: np.ndarray
    cand_rows: np.ndarray
    top_k: int
    explain: bool
    settle: Callable[[object, BaseException | None], None]
    diversity: float = 0.0  # MMR over the candidates' serving vectors (rmbert.beyond.mmr_order)
    side: np.ndarray | None = None  # the retrieval proxy's side-path features of cand_rows [C, k]
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set when the client went away: the worker skips the job


@dataclass
class Ranked:
    """The worker's answer: scores [C] in candidate order, the top_k order, and the ranked list
    (ids, scores, titles and explanations) already encoded as JSON."""

    scores: np.ndarray
    order: np.ndarray
    ranked_json: bytes


class Ranker:
    """Scores candidates for histories through the run's recommender, batching concurrent requests.

    One worker thread takes the requests waiting in the queue (up to `max_batch`, in arrival
    order), pads them into one [B, C, ...] batch and runs a single forward: under load the
    matrix products grow instead of queueing. Per-request cost is flat from B = 4 up, so a small
    `max_batch` costs no throughput and bounds how long a request can wait behind one batch.
    The recommender scores in its inference form (RMBERT: folded), with each news's terms
    precomputed in the serving index (`prepare`). Ordering and explanations are built in the
    worker too, so the event loop only ever formats answers. The queue is bounded; requests
    whose clients left, or that waited past `queue_timeout`, are dropped unscored.
    """

    def __init__(
        self,
        run: LoadedRun,
        max_batch: int = 8,
        max_queue: int = 64,
        queue_timeout: float = 10.0,
        device: str = "cpu",
        threads: int = 0,
        click_terms: bool = True,
    ):
        """threads: the worker's torch threads (0: torch's default); the calling thread's, and
        the default of threads started later, are left alone. click_terms: the serving index
        holds each news's products as a click (`InferenceForm.click_terms`; the default RMBERT:
        18 KB a news), so a request gathers its clicks' instead of computing them (on the CPU
        only)."""
        if threads < 0:
            raise ValueError(f"worker_threads must be >= 0, not {threads}")
        self.run = run
        self.threads = threads
        self.started = threading.Event()  # the worker has set its threads
        self.device = torch.device(device)
        run.model.to(self.device)  # the index stays in host memory; each batch moves to the device
        self.form = run.model.rec.inference_form(embed_words=run.model.news.embed_words)
        self.max_history = run.cfg.train.max_history
        heads = getattr(self.form, "S", None) is not None and self.form.cfg.similarity_heads > 1
        self.proxy_heads = 2 * (self.form.cfg.similarity_heads - 1) if heads else 0  # their columns
        self.click_terms = click_terms and self.device.type == "cpu"  # a GPU computes them at once
        # the recency embeddings' products, added to the clicks' (the maps are linear)
        pos = getattr(run.model.features, "pos", None)
        self.recency_terms = {}
        if self.click_terms and pos is not None:
            with torch.inference_mode():
                terms = self.form.click_terms(pos.weight, norms=False)
                self.recency_terms = {k: v.cpu() for k, v in terms.items()}  # added on the host
        self.max_batch, self.queue_timeout = max_batch, queue_timeout
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # worker thread only
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.dropped = 0  # jobs skipped because their client left or they waited too long
        before = torch.get_num_threads()
        self.worker = threading.Thread(target=self._loop, name="rmbert-ranker", daemon=True)
        self.worker.start()
        if threads:  # torch.set_num_threads also sets the default of threads started later: restore it
            self.started.wait()
            torch.set_num_threads(before)

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=10)

    @torch.inference_mode()
    def prepare(
        self, arrays: dict[str, np.ndarray], info: list[dict], ids: list[str] | None = None, chunk: int = 2048
    ) -> dict[str, np.ndarray]:
        """Per-news arrays for the serving index: the news vectors the model reads (pooled,
        standardised and with features, as the run was trained) and the inference form's news
        terms, and `prior` [n], each news's score for a user without clicks (the candidate-only
        prior, which the retrieval stage draws on), and the side tables the inference form reads.
        Runs once per news, `chunk` news at a time; `info` gives the news features, `ids` the
        news ids (for a model with a news-id field)."""
        model, cfg = self.run.model, self.run.cfg
        vectors = arrays["pool"] if cfg.encoder.pooling == "mean" else arrays["cls"]
        src = ServingSource(ids or [""] * len(info), info, arrays["input_ids"], arrays["attn"])
        side = serving_tables(
            self.form.side_tables,
            src,
            vocab=self.run.vocab,
            match_width=2 + cfg.features.max_entities,
            title_len=cfg.encoder.max_title_len,
            sep_token_id=self.run.tokenizer.sep_token_id,
            tokenizer=self.run.tokenizer,
            abstract_len=cfg.naml.abstract_len,
        )
        fids = None
        if model.features is not None and self.run.vocab is not None:
            fids = self.run.vocab.ids(
                [i.get("category", "") for i in info],
                [i.get("subcategory", "") for i in info],
                [list(i.get("entities", [])) for i in info],
                cfg.features.max_entities,
            )
        parts: dict[str, list[torch.Tensor]] = {}
        dev = self.device
        for i in range(0, len(arrays["cls"]), chunk):
            x = torch.from_numpy(np.array(vectors[i : i + chunk], dtype=np.float32)).to(dev)
            X = torch.from_numpy(np.array(arrays["tokens"][i : i + chunk], dtype=np.float32)).to(dev)
            mask = torch.from_numpy(np.array(arrays["mask"][i : i + chunk])).to(dev)
            got = {}
            if cfg.encoder.standardize:
                x, X = model.news.standardize(x, X, mask)
                got["tokens"] = X
            if fids is not None:
                x = x + model.features(torch.from_numpy(fids[i : i + chunk]).to(dev))
            got["cls"] = x
            got.update(self.form.news_terms(NewsRepr(x, X, mask)))
            if self.click_terms:
                got.update(self.form.click_terms(x))
            got.update({k: torch.from_numpy(v[i : i + chunk]).to(dev) for k, v in side.items()})
            got.update(self.form.table_terms(got))
            terms = {k: v[None] for k, v in got.items() if k in self.form.token_axes}
            terms |= {
                "history_" + k: torch.zeros(1, 1, *v.shape[1:], dtype=torch.int64, device=dev)
                for k, v in side.items()
            }
            if self.form.history_tokens:  # one padded clicked news
                terms["history_tokens"], terms["history_mask"] = X[:1, None] * 0, mask[:1, None] & False
            nobody = (x.new_zeros(1, 1, x.shape[-1]), torch.zeros(1, 1, dtype=torch.bool, device=dev))
            got["prior"] = self.form.score(*nobody, NewsRepr(x[None], X[None], mask[None]), terms).logits[0]
            for k, v in got.items():
                parts.setdefault(k, []).append(v.cpu())
        return {k: torch.cat(v).numpy() for k, v in parts.items()}

    async def rank(
        self,
        snap: Snapshot,
        hist_rows: np.ndarray,
        cand_rows: np.ndarray,
        top_k: int,
        explain: bool,
        diversity: float = 0.0,
        side: np.ndarray | None = None,
    ) -> Ranked:
        """Awaits the worker thread; the event loop stays free for other requests meanwhile.
        Raises Busy when the queue is full or the request waited too long. side: the retrieval
        proxy's side-path features of cand_rows (`Snapshot.retrieve_side`), which the model
        reads instead of computing them again, or None."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result, error) -> None:
            loop.call_soon_threadsafe(_resolve, fut, result, error)

        job = Job(snap, hist_rows[-self.max_history :], cand_rows, top_k, explain, settle, diversity, side)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: do not score it
            raise

    def content_proxy(self):
        """The inference form's side-path features for the retrieval proxy as `(arrays, rows,
        clicks) -> [G, k]` (serve/retrieval.py), or None for a model without them. Called with
        early=True: the columns `content.early_columns` of those alone ([G, e], the form's
        `content_columns`: eq. 8''''' of the folded RMBERT), which the second cut ranks by; with
        given=[G, e], those columns as early gave them, read instead of computed again."""
        fn, names, heads = self.form.content_proxy, self.form.proxy_tables, self.proxy_heads > 0
        if fn is None and not heads:
            return None
        dev = self.device

        @torch.inference_mode()
        def content(
            arrays: dict,
            rows: np.ndarray,
            clicks: np.ndarray,
            early: bool = False,
            given: np.ndarray | None = None,
        ) -> np.ndarray:
            def tables(r: np.ndarray) -> dict[str, torch.Tensor]:  # (`take`: on every core)
                return {k: torch.from_numpy(np.asarray(take(arrays[k], r))).to(dev) for k in names}

            if early:
                return fn(tables(rows), tables(clicks), content_only=True).float().cpu().numpy()
            parts = [head_cosines(arrays.get("heads8", arrays["sim"][:, 1:]), rows, clicks)] if heads else []
            if fn is not None:
                known = None if given is None else torch.from_numpy(np.asarray(given, np.float32)).to(dev)
                parts.append(fn(tables(rows), tables(clicks), content=known).float().cpu().numpy())
            return np.concatenate(parts, 1)

        early = self.form.content_columns if fn is not None else 0  # after the heads' columns
        content.early_columns = tuple(range(self.proxy_heads, self.proxy_heads + early))
        return content

    def subcategory_affinity(self) -> tuple[np.ndarray, np.ndarray] | None:
        """A model with eq. 8f (`rmbert.field_affinity`): its learned subcategory affinity A_s
        [N_s, N_s] (candidate id, clicked id) and each id's match key [N_s] (0 for id 0), for the
        retrieval stage's related subcategories (`Related`); else None."""
        rec, vocab = self.run.model.rec, self.run.vocab
        A = getattr(rec, "A_s", None)
        if A is None or vocab is None or not getattr(rec.cfg, "field_affinity", False):
            return None
        keys = np.array([0] + [match_key("s", v) for v in vocab.subcategories], dtype=np.int64)
        if len(keys) != A.shape[0]:
            return None
        return A.detach().float().cpu().numpy(), keys

    def score_rows(
        self, snap: Snapshot, hist_rows: np.ndarray, cand_rows: np.ndarray, chunk: int = 2000
    ) -> np.ndarray:
        """Scores [C] of candidate rows for one user, `chunk` candidates at a time, computed in
        the calling thread: for work before serving starts (calibration) or offline, never
        beside the worker (they would share its buffers)."""
        hist = hist_rows[-self.max_history :]
        parts = [
            self._score([Job(snap, hist, cand_rows[i : i + chunk], 1, False, lambda r, e: None)])[0].scores
            for i in range(0, len(cand_rows), chunk)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def score_queued(
        self,
        snap: Snapshot,
        hist_rows: np.ndarray,
        cand_rows: np.ndarray,
        chunk: int = 1000,
        side: np.ndarray | None = None,
    ) -> np.ndarray:
        """Scores [C] of candidate rows for one user, computed by the worker (so safe while it
        serves), `chunk` candidates a job, for a thread that may block: each job waits its turn
        in the queue like a request. side: as `rank`'s."""
        parts = []
        for i in range(0, len(cand_rows), chunk):
            done, out = threading.Event(), []

            def settle(result, error, done=done, out=out) -> None:
                out.append((result, error))
                done.set()

            part = None if side is None else side[i : i + chunk]
            job = Job(
                snap, hist_rows[-self.max_history :], cand_rows[i : i + chunk], 1, False, settle, side=part
            )
            try:
                self.queue.put(job, timeout=self.queue_timeout)
            except queue.Full:
                raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
            if not done.wait(timeout=self.queue_timeout + 60):  # the worker stopped (shutdown)
                job.cancelled = True
                raise Busy("the worker did not answer")
            result, error = out[0]
            if error is not None:
                raise error
            parts.append(result.scores)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
            torch.get_num_threads()  # fixes this thread's count before __init__ restores the default
        self.started.set()
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                jobs.append(nxt)
            now = time.monotonic()
            live = []
            for j in jobs:
                if j.cancelled:
                    self.dropped += 1
                elif now - j.enqueued > self.queue_timeout:
                    self.dropped += 1
                    j.settle(None, Busy(f"waited {now - j.enqueued:.1f} s for the model"))
                else:
                    live.append(j)
            if not live:
                continue
            try:
                results = self._score(live)
            except BaseException as e:  # handed to every waiting request
                for j in live:
                    j.settle(None, e)
                continue
            for j, r in zip(live, results):
                j.settle(r, None)

    def _take(self, name: str, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """src[rows] as float32, gathered into buffers the worker reuses: a fresh [B C, L, D]
        tensor per batch would be a fresh mmap, and its page faults cost more than the gather."""
        n = len(rows)
        have = len(self.buffers[name][0]) if name in self.buffers else 0
        if have < n:
            size = (max(n, 2 * have), *src.shape[1:])
            self.buffers[name] = (torch.empty(size, dtype=src.dtype), torch.empty(size))
        raw, f32 = self.buffers[name]
        torch.index_select(src, 0, rows, out=raw[:n])
        return f32[:n].copy_(raw[:n]) if src.dtype != torch.float32 else raw[:n]

    @torch.inference_mode()
    def _score(self, jobs: list[Job]) -> list[Ranked]:
        """Pad the jobs into one batch (row 0, the null news, fills), run one forward, then order
        each job's candidates and build its explanations."""
        snap = max((j.snap for j in jobs), key=lambda sn: sn.n)  # rows only ever get appended
        T = snap.tensors
        B = len(jobs)
        M = max(1, max(len(j.hist_rows) for j in jobs))
        C = max(len(j.cand_rows) for j in jobs)
        hist, cand = np.zeros((B, M), np.int64), np.zeros((B, C), np.int64)
        for b, j in enumerate(jobs):
            hist[b, : len(j.hist_rows)] = j.hist_rows
            cand[b, : len(j.cand_rows)] = j.cand_rows
        hist_t, cand_t = torch.from_numpy(hist), torch.from_numpy(cand).flatten()
        hm = hist_t > 0
        xmask = T["mask"].index_select(0, cand_t)  # [B C, L]
        Lb = int(xmask.any(0).nonzero().max()) + 1 if xmask.any() else 1  # the batch's longest title
        D = T["cls"].shape[1]
        H = T["cls"].index_select(0, hist_t.flatten()).view(B, M, D)
        x = T["cls"].index_select(0, cand_t).view(B, C, D)
        X = None  # the candidates' title tokens, where the inference form reads them
        if self.form.candidate_tokens:
            X = self._take("tokens", T["tokens"], cand_t)[:, :Lb].view(B, C, Lb, D)
        xmask = xmask[:, :Lb].reshape(B, C, Lb)
        terms = {}
        record = any(j.explain for j in jobs)
        for name, axes in self.form.token_axes.items():
            if name in self.form.record_terms and not record:
                continue
            t = self._take(name, T[name], cand_t) if axes == 2 else T[name].index_select(0, cand_t)
            for a in range(1, axes + 1):
                t = t.narrow(t.dim() - a, 0, Lb)
            terms[name] = t.reshape(B, C, *t.shape[1:])
        if self.form.history_tokens:  # the clicked news' title tokens, to their longest title
            hmask = T["mask"].index_select(0, hist_t.flatten())  # [B M, L]
            Lh = int(hmask.any(0).nonzero().max()) + 1 if hmask.any() else 1
            Xh = self._take("history_tokens", T["tokens"], hist_t.flatten())[:, :Lh]
            terms["history_tokens"], terms["history_mask"] = (
                Xh.reshape(B, M, Lh, D),
                hmask[:, :Lh].reshape(B, M, Lh),
            )
        for name in self.form.side_tables:
            terms["history_" + name] = (
                T[name].index_select(0, hist_t.flatten()).view(B, M, *T[name].shape[1:])
            )
        if "click_map" in T:  # the clicks' products, precomputed per news
            terms |= self._click_products(T, hist_t, hm)
        if self.form.content_proxy is not None and all(j.side is not None for j in jobs):
            proxy = np.zeros((B, C, jobs[0].side.shape[1] - self.proxy_heads), np.float32)
            for b, j in enumerate(jobs):  # the form's own columns (`proxy_features`), after the heads'
                proxy[b, : len(j.cand_rows)] = j.side[:, self.proxy_heads :]
            terms["proxy"] = torch.from_numpy(proxy)
        if self.device.type != "cpu":
            H, hm, x, xmask = (t.to(self.device, non_blocking=True) for t in (H, hm, x, xmask))
            X = None if X is None else X.to(self.device, non_blocking=True)
            terms = {k: v.to(self.device, non_blocking=True) for k, v in terms.items()}
        if self.run.model.features is not None:
            H = H + self.run.model.features.positions(hm)  # recency embeddings (history_position)
        out = self.form.score(H, hm, NewsRepr(x, X, xmask), terms, record=record)
        out.logits = out.logits.float().cpu()
        if out.attentions is not None:
            out.attentions = {k: v.float().cpu() for k, v in out.attentions.items()}
        if not torch.isfinite(out.logits).all():
            raise FloatingPointError("the model produced a non-finite score; nothing was served")
        return self._ranked(snap, jobs, out, x, Lb)

    def _click_products(self, T: dict, hist: torch.Tensor, hm: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clicks hist [B, M]'s products as clicks, gathered from the index and shifted by
        their recency embeddings' (history_position): terms "history_click_map" [B, M, W] and,
        with similarity, "history_click_sim" [B, M, h, D] (`InferenceForm.click_terms`)."""
        flat, (B, M) = hist.flatten(), hist.shape
        out = {"click_map": T["click_map"].index_select(0, flat)}
        if "click_scale" in T:  # S x = unit S x * |S x|
            out["click_sim"] = (
                T["sim"].index_select(0, flat) * T["click_scale"].index_select(0, flat)[..., None]
            )
        out = {k: v.view(B, M, *v.shape[1:]) for k, v in out.items()}
        if self.recency_terms:
            ids = self.run.model.features.recency(hm)  # [B, M]
            out = {k: v + self.recency_terms[k][ids] for k, v in out.items()}
        return {"history_" + k: v for k, v in out.items()}

    def _ranked(self, snap: Snapshot, jobs: list[Job], out, x: torch.Tensor, Lb: int) -> list[Ranked]:
        """Each job's order (MMR when it asks for diversity) and its JSON body, explanations included."""
        att = out.attentions
        results = []
        for b, j in enumerate(jobs):
            n = len(j.cand_rows)
            scores = out.logits[b, :n].numpy().copy()
            unit = None
            if j.diversity > 0:
                unit = torch.nn.functional.normalize(x[b, :n].float(), dim=-1).cpu().numpy()
            order = mmr_order(scores, unit, j.top_k, j.diversity)
            a = None
            if j.explain and att is not None:
                a = (att["title"][b].numpy(), att["history"][b, :, :, : len(j.hist_rows)].numpy())
            body = explain.ranked_json(
                snap, self.run.tokenizer, j.cand_rows, j.hist_rows, scores, order, a, Lb
            )
            results.append(Ranked(scores, order, body))
        return results


def _resolve(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.cancelled():  # the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
