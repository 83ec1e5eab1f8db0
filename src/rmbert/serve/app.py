"""The HTTP service: rank news for a user, explain why, take fresh news without a restart.

News are encoded offline into the store; per request only the reasoning cells run: the user
side (H and its projections) once, then every candidate in one batch through the fast path.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from rmbert.encoders.bert import NewsRepr
from rmbert.encoders.store import NewsStore
from rmbert.models.rmbert import RMBERT, NewsTerms
from rmbert.run import LoadedRun, load_run
from rmbert.serve.index import ServingIndex, Snapshot
from rmbert.serve.schemas import (
    NewsAdded,
    NewsBatch,
    NewsInfo,
    NewsItem,
    Ranked,
    RankRequest,
    RankResponse,
    Step,
)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    max_history: int = 500  # ids per request (the model reads the most recent train.max_history)
    max_candidates: int = 2000
    fresh_candidates: int = 100  # candidates when the request gives none
    max_news_per_post: int = 2000
    max_batch: int = 8  # /rank requests scored in one forward; small keeps the latency tail short


class Metrics:
    """Prometheus counters and a latency histogram, kept by hand (text exposition format)."""

    BUCKETS = (0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            h = self.hist.setdefault(path, [0] * (len(self.BUCKETS) + 1))
            for i, b in enumerate(self.BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-1] += 1
            self.sums[path] = self.sums.get(path, 0.0) + seconds

    def render(self, store_size: int) -> str:
        out = [
            "# HELP rmbert_requests_total HTTP requests by path and status.",
            "# TYPE rmbert_requests_total counter",
        ]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                out.append(f'rmbert_requests_total{{path="{path}",status="{status}"}} {n}')
            out += [
                "# HELP rmbert_errors_total HTTP responses with status >= 400.",
                "# TYPE rmbert_errors_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                if status >= 400:
                    out.append(f'rmbert_errors_total{{path="{path}",status="{status}"}} {n}')
            out += [
                "# HELP rmbert_request_seconds Request latency.",
                "# TYPE rmbert_request_seconds histogram",
            ]
            for path, h in sorted(self.hist.items()):
                for b, c in zip(self.BUCKETS, h):
                    out.append(f'rmbert_request_seconds_bucket{{path="{path}",le="{b}"}} {c}')
                out.append(f'rmbert_request_seconds_bucket{{path="{path}",le="+Inf"}} {h[-1]}')
                out.append(f'rmbert_request_seconds_sum{{path="{path}"}} {self.sums[path]:.6f}')
                out.append(f'rmbert_request_seconds_count{{path="{path}"}} {h[-1]}')
        out += [
            "# HELP rmbert_store_news News in the store.",
            "# TYPE rmbert_store_news gauge",
            f"rmbert_store_news {store_size}",
        ]
        return "\n".join(out) + "\n"


def _dedupe(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _words(tokenizer, ids: np.ndarray, weights: np.ndarray) -> list[tuple[str, float]]:
    """WordPiece tokens -> words, with the weights of a word's pieces summed."""
    words: list[tuple[str, float]] = []
    for tok, w in zip(tokenizer.convert_ids_to_tokens(ids.tolist()), weights.tolist()):
        if tok.startswith("##") and words:
            words[-1] = (words[-1][0] + tok[2:], words[-1][1] + w)
        else:
            words.append((tok, w))
    return words


@dataclass
class Job:
    """One /rank request waiting for the inference worker; `settle(result, error)` is called once."""

    snap: Snapshot
    hist_rows: np.ndarray
    cand_rows: np.ndarray
    explain: bool
    settle: Callable[[tuple | None, BaseException | None], None]


class Ranker:
    """Scores candidates for histories through the run's recommender, batching concurrent requests.

    One worker thread takes the requests waiting in the queue (up to `max_batch`, in arrival
    order), pads them into one [B, C, ...] batch and runs a single forward: under load the
    matrix products grow instead of queueing. Per-request cost is flat from B = 4 up, so a small
    `max_batch` costs no throughput and bounds how long a request can wait behind one batch.
    RMBERT runs in its folded inference form (`FoldedRMBERT`), with each news's terms
    precomputed in the serving index (`prepare`) and each user's once per request.
    """

    def __init__(self, run: LoadedRun, max_batch: int = 8) -> None:
        self.run = run
        self.rec = run.model.rec
        self.folded = self.rec.fold() if isinstance(self.rec, RMBERT) else None
        self.max_history = run.cfg.train.max_history
        self.max_batch = max_batch
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # worker thread only
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._loop, name="rmbert-ranker", daemon=True)
        self.worker.start()

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=10)

    @torch.inference_mode()
    def prepare(
        self, arrays: dict[str, np.ndarray], info: list[dict], chunk: int = 2048
    ) -> dict[str, np.ndarray]:
        """Per-news arrays for the serving index: the news vectors the model reads (pooled,
        standardised and with features, as the run was trained) and, for RMBERT, the folded form's
        news terms. Runs once per news, `chunk` news at a time; `info` gives the news features."""
        model, cfg = self.run.model, self.run.cfg
        side, standardize = model.news, cfg.encoder.standardize
        vectors = arrays["pool"] if cfg.encoder.pooling == "mean" else arrays["cls"]
        fids = None
        if model.features is not None and self.run.vocab is not None:
            ents = [list(i.get("entities", [])) for i in info]
            fids = self.run.vocab.ids(
                [i.get("category", "") for i in info],
                [i.get("subcategory", "") for i in info],
                ents,
                cfg.features.max_entities,
            )
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(arrays["cls"]), chunk):
            x = torch.from_numpy(np.array(vectors[i : i + chunk], dtype=np.float32))
            X = torch.from_numpy(np.array(arrays["tokens"][i : i + chunk], dtype=np.float32))
            got = {}
            if standardize:
                x, X = side.standardize(x, X, torch.from_numpy(np.array(arrays["mask"][i : i + chunk])))
                got.update(tokens=X)
            if fids is not None:
                x = x + model.features(torch.from_numpy(fids[i : i + chunk]))
            got.update(cls=x)
            if self.folded is not None:
                t = self.folded.news_terms(NewsRepr(x, X, None))
                got.update(base=t.base, K=t.K, click=t.click)
            for k, v in got.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v).numpy() for k, v in parts.items()}

    async def rank(self, snap: Snapshot, hist_rows: np.ndarray, cand_rows: np.ndarray, explain: bool):
        """-> scores [C], attention {title [C, p, L], history [C, p, M]} or None, L used.

        Awaits the worker thread; the event loop stays free for other requests meanwhile."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result, error) -> None:
            loop.call_soon_threadsafe(_resolve, fut, result, error)

        self.queue.put(Job(snap, hist_rows[-self.max_history :], cand_rows, explain, settle))
        return await fut

    def _loop(self) -> None:
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
            try:
                results = self._score(jobs)
            except BaseException as e:  # handed to every waiting request
                for j in jobs:
                    j.settle(None, e)
                continue
            for j, r in zip(jobs, results):
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
    def _score(self, jobs: list[Job]) -> list[tuple]:
        """Pad the jobs into one batch (row 0, the null news, fills) and run one forward."""
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
        H = T["cls"].index_select(0, hist_t.flatten()).float().view(B, M, D)
        X = self._take("tokens", T["tokens"], cand_t)[:, :Lb].view(B, C, Lb, D)
        xmask = xmask[:, :Lb].reshape(B, C, Lb)
        record = any(j.explain for j in jobs)
        att = None
        if self.folded is not None:
            terms = NewsTerms(
                base=T["base"].index_select(0, cand_t)[..., :Lb].view(B, C, -1, Lb),
                K=self._take("K", T["K"], cand_t)[:, :Lb, :Lb].view(B, C, Lb, Lb),
                click=T["click"].index_select(0, cand_t).view(B, C, -1),
            )
            x = T["cls"].index_select(0, cand_t).view(B, C, D) if self.folded.y0 is not None else None
            out = self.folded.score(
                self.folded.user_state(H, hm), NewsRepr(x, X, xmask), terms, record=record
            )
            logits, att = out if record else (out, None)
        else:
            x = T["cls"].index_select(0, cand_t).float().view(B, C, D)
            state = self.rec.user_state(NewsRepr(cls=H, tokens=None, mask=None), hm, None)
            logits = self.rec.score_candidates(state, NewsRepr(cls=x, tokens=X, mask=xmask))
        results = []
        for b, j in enumerate(jobs):
            n = len(j.cand_rows)
            a_b = {k: v[b, :n].numpy() for k, v in att.items()} if (att is not None and j.explain) else None
            results.append((logits[b, :n].numpy(), a_b, Lb))
        return results


def _resolve(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.cancelled():  # the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class MetricsMiddleware:
    """Counts every HTTP request by path and status, with its latency (plain ASGI: no per-request
    task group or body streams, unlike `@app.middleware`)."""

    PATHS = frozenset({"/rank", "/news", "/health", "/metrics", "/", "/users"})

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]  # an exception that escapes counts as 500

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.observe(path, status[0], time.perf_counter() - t0)


def create_app(
    run_dir: str | Path, store_dir: str | Path, behaviors: str | Path | None = None, limits: Limits = Limits()
) -> FastAPI:
    """The app factory: the model and the store load in the lifespan hook."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_grad_enabled(False)
        run = load_run(run_dir)
        store = NewsStore.open(store_dir)
        if store.meta["kind"] != "vectors":
            raise ValueError(f"{store_dir}: serving needs a 'vectors' store (made by `rmbert encode`)")
        if store.meta.get("encoder") != run.fingerprint:
            raise ValueError(
                f"{store_dir}: encoded with another encoder than {run_dir}; run `rmbert encode` again"
            )
        if run.cfg.encoder.mode not in ("frozen", "top-k", "full") or run.model.rec.needs_history_tokens:
            raise ValueError(
                f"{run_dir}: serving needs a model over BERT news vectors (encoder mode frozen, top-k or full)"
            )
        ranker = Ranker(run, limits.max_batch)
        index = ServingIndex(store, ranker.prepare)
        state.update(run=run, index=index, ranker=ranker, users=_load_users(behaviors, run))
        yield
        ranker.close()
        state.clear()

    app = FastAPI(title="rmbert", description="RMBERT news ranking with explanations", lifespan=lifespan)
    metrics = Metrics()

    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/health")
    def health() -> dict:
        idx: ServingIndex = state["index"]
        return {"status": "ok", "news": len(idx.snapshot.index), "model": state["run"].cfg.model}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prom() -> str:
        return metrics.render(len(state["index"].snapshot.index))

    @app.post("/rank", response_model=RankResponse, response_model_exclude_none=True)
    async def rank(req: RankRequest) -> RankResponse:
        snap: Snapshot = state["index"].snapshot
        if len(req.history) > limits.max_history:
            raise HTTPException(413, f"history has {len(req.history)} ids; the limit is {limits.max_history}")
        if req.candidates is not None and len(req.candidates) > limits.max_candidates:
            raise HTTPException(
                413, f"{len(req.candidates)} candidates; the limit is {limits.max_candidates}"
            )
        history = _dedupe(req.history)
        unknown = [i for i in history + (req.candidates or []) if i not in snap.index]
        if unknown:
            raise HTTPException(404, {"message": "unknown news ids", "unknown_ids": _dedupe(unknown)})
        hist_rows = np.array([snap.index[i] for i in history], dtype=np.int64)
        dropped = 0
        if req.candidates is None:
            seen = set(hist_rows.tolist())
            cand_rows = np.array(
                [r for r in snap.fresh[: limits.fresh_candidates + len(seen)] if r not in seen][
                    : limits.fresh_candidates
                ],
                dtype=np.int64,
            )
        else:
            cands = _dedupe(req.candidates)
            dropped = len(req.candidates) - len(cands)
            cand_rows = np.array([snap.index[i] for i in cands], dtype=np.int64)
        if len(cand_rows) == 0:
            return RankResponse(ranked=[], history_used=0, candidates=0, note="no candidates")
        scores, att, Lb = await state["ranker"].rank(snap, hist_rows, cand_rows, req.explain)
        order = np.argsort(-scores, kind="stable")[: req.top_k]
        used = hist_rows[-state["ranker"].max_history :]
        tok = state["run"].tokenizer
        ranked = []
        for j in order:
            r = int(cand_rows[j])
            info = snap.info[r]
            item = Ranked(
                id=_id_of(snap, r),
                score=float(scores[j]),
                title=info.get("title", ""),
                category=info.get("category", ""),
            )
            if att is not None:
                ids = snap.arrays["input_ids"][r, 1 : Lb + 1]
                m = snap.arrays["mask"][r, :Lb]
                item.steps = [
                    Step(
                        history=[
                            {"id": _id_of(snap, int(hr)), "weight": float(w)}
                            for hr, w in zip(used, att["history"][j, s])
                        ],
                        title=[
                            {"word": wd, "weight": float(w)}
                            for wd, w in _words(tok, ids[m], att["title"][j, s, :Lb][m])
                        ],
                    )
                    for s in range(att["title"].shape[1])
                ]
            ranked.append(item)
        note = "empty history: scores are a candidate-only prior" if len(used) == 0 else None
        return RankResponse(
            ranked=ranked,
            history_used=len(used),
            candidates=len(cand_rows),
            duplicates_dropped=dropped,
            note=note,
        )

    @app.post("/news", response_model=NewsAdded)
    def add_news(batch: NewsBatch | list[NewsItem]) -> NewsAdded:
        items = batch.news if isinstance(batch, NewsBatch) else batch
        if len(items) > limits.max_news_per_post:
            raise HTTPException(
                413, f"{len(items)} news in one request; the limit is {limits.max_news_per_post}"
            )
        latest = {it.id: it for it in items}  # a repeated id: the last one wins
        items = list(latest.values())
        if not items:
            return NewsAdded(added=0, updated=0, store_size=len(state["index"].snapshot.index))
        index: ServingIndex = state["index"]
        run: LoadedRun = state["run"]
        with index.lock:
            known = sum(1 for it in items if it.id in index.index)
            first_new = len(index.store)
            info = [
                {"category": it.category, "subcategory": it.subcategory, "entities": it.entities}
                for it in items
            ]
            store = index.store.append(
                [it.id for it in items], [it.title for it in items], run.encoder, run.tokenizer, info
            )
            index.add(store, first_new)
        return NewsAdded(added=len(items) - known, updated=known, store_size=len(index.snapshot.index))

    @app.get("/news", response_model=list[NewsInfo])
    def get_news(ids: str) -> list[NewsInfo]:
        snap: Snapshot = state["index"].snapshot
        out = []
        for nid in _dedupe([i for i in ids.split(",") if i]):
            r = snap.index.get(nid)
            if r is not None:
                info = snap.info[r]
                out.append(
                    NewsInfo(
                        id=nid,
                        title=info.get("title", ""),
                        category=info.get("category", ""),
                        subcategory=info.get("subcategory", ""),
                    )
                )
        return out

    @app.get("/users")
    def users(limit: int = 200) -> list[dict]:
        return state["users"][: max(0, limit)]

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    return app


def _id_of(snap: Snapshot, row: int) -> str:
    return snap.info[row].get("id", "")


def _load_users(behaviors: str | Path | None, run: LoadedRun) -> list[dict]:
    """Users of a behaviors file (first impression each) for the page's picker."""
    if behaviors is None:
        return []
    from rmbert.data.mind import read_lines

    out, seen = [], set()
    for line in read_lines(behaviors):
        cols = line.split("\t")
        if len(cols) != 5 or cols[1] in seen:
            continue
        seen.add(cols[1])
        cands = [c.rsplit("-", 1)[0] for c in cols[4].split()]
        out.append({"user": cols[1], "history": cols[3].split(), "candidates": cands})
        if len(out) >= 1000:
            break
    return out
