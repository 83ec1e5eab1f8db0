"""The HTTP service: rank news for a user, explain why, take fresh news without a restart.

News are encoded offline into the store; per request only the reasoning cells run: the user
side once, then every candidate in one batch through the model's inference form. This module
is the factory: lifespan (load, check, start the worker and the store watcher), middleware
(body limit, metrics) and error handlers. Routes live in `routes.py`, the worker in `ranker.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from rmbert.data.mind import MindFormatError, load_impressions
from rmbert.encoders.store import NewsStore
from rmbert.run import LoadedRun, load_run
from rmbert.serve.index import ServingIndex
from rmbert.serve.metrics import BodyLimit, Metrics, MetricsMiddleware
from rmbert.serve.ranker import Ranker
from rmbert.serve.routes import router
from rmbert.serve.state import Limits, ServingState

__all__ = ["Limits", "create_app"]


def check_servable(run: LoadedRun, store: NewsStore, run_dir, store_dir) -> None:
    if store.meta["kind"] != "vectors":
        raise ValueError(f"{store_dir}: serving needs a 'vectors' store (made by `rmbert encode`)")
    if store.meta.get("encoder") != run.fingerprint:
        raise ValueError(
            f"{store_dir}: encoded with another encoder than {run_dir}; run `rmbert encode` again"
        )
    if run.cfg.encoder.mode not in ("frozen", "top-k", "full"):
        raise ValueError(
            f"{run_dir}: serving needs a model over BERT news vectors (encoder mode frozen, top-k or full)"
        )


async def watch_store(index: ServingIndex, every: float) -> None:
    """Take in segments that other writers (`rmbert encode`, another server) commit."""
    meta = index.store.path / "meta.json"
    last = None
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(OSError):
            st = meta.stat()
            if (st.st_mtime_ns, st.st_size) != last:
                last = (st.st_mtime_ns, st.st_size)
                await asyncio.to_thread(index.refresh)


def create_app(
    run_dir: str | Path,
    store_dir: str | Path,
    behaviors: str | Path | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The app factory: the model and the store load in the lifespan hook. A model that cannot
    serve (non-finite weights) leaves the service up with /health saying why, and every
    ranking route answering 503."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_grad_enabled(False)
        state = ServingState(limits)
        app.state.serving = state
        store = NewsStore.open(store_dir)
        try:
            run = load_run(run_dir)
        except ValueError as e:  # e.g. non-finite weights: refuse to rank, say why on /health
            state.problem = str(e)
            yield
            return
        check_servable(run, store, run_dir, store_dir)
        ranker = Ranker(
            run,
            limits.max_batch,
            limits.max_queue,
            limits.queue_timeout_s,
            limits.device,
            limits.worker_threads,
            limits.click_terms,
        )
        retrieval = dataclasses.replace(limits.retrieval, max_history=run.cfg.train.max_history)
        index = ServingIndex(
            store, ranker.prepare, retrieval, ranker.content_proxy(), ranker.subcategory_affinity()
        )
        index.calibrate(lambda hist, cand: ranker.score_rows(index.snapshot, hist, cand))  # before serving
        index.score_added = ranker.score_queued  # news added from now on: scored by the worker
        state.run, state.index, state.ranker = run, index, ranker
        state.users = load_users(behaviors, store.live_ids)
        watcher = (
            asyncio.create_task(watch_store(index, limits.store_poll_s)) if limits.store_poll_s else None
        )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            ranker.close()

    app = FastAPI(title="rmbert", description="RMBERT news ranking with explanations", lifespan=lifespan)
    app.state.metrics = Metrics()
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse(status_code=422, content={"detail": str(exc)[:1000]})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """Where and what, never the offending input itself (it may be megabytes)."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:20]]
        return JSONResponse(status_code=422, content={"detail": errors})

    return app


def load_users(behaviors: str | Path | None, known: list[str], limit: int = 1000) -> list[dict]:
    """Users of a behaviors file (first impression each) for the page's picker, read with the
    data layer against the store's news ids (ids the store lacks are left out)."""
    if behaviors is None:
        return []
    from rmbert.data.mind import News

    blank = [""] * len(known)
    try:
        imps = load_impressions(behaviors, News(list(known), blank, blank, blank, blank))
    except MindFormatError as e:
        raise ValueError(f"--behaviors: {e}") from None
    out, seen = [], set()
    for i in range(len(imps)):
        u = imps.users[imps.user_idx[i]]
        if u in seen:
            continue
        seen.add(u)
        hist = imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]
        cand = imps.cand[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
        out.append(
            {"user": u, "history": [known[j] for j in hist], "candidates": [known[j] for j in cand if j >= 0]}
        )
        if len(out) >= limit:
            break
    return out
