"""The HTTP routes: thin handlers over the typed serving state."""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import StringConstraints

from rmbert.encoders.store import StoreError
from rmbert.serve.ranker import Busy
from rmbert.serve.schemas import ID_MAX, NewsAdded, NewsBatch, NewsInfo, NewsItem, RankRequest, RankResponse
from rmbert.serve.state import State, static_dir

router = APIRouter()
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _dedupe(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


@router.get("/health")
def health(state: State):
    if state.problem or state.index is None or state.run is None:
        return JSONResponse(status_code=503, content={"status": "unavailable", "problem": state.problem})
    return {"status": "ok", "news": len(state.index.snapshot.index), "model": state.run.cfg.model}


@router.get("/metrics")
def metrics(request: Request, state: State) -> Response:
    size = len(state.index.snapshot.index) if state.index else 0
    dropped = state.ranker.dropped if state.ranker else 0
    body = request.app.state.metrics.render(size, dropped)
    return Response(body, media_type="text/plain; version=0.0.4")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/rank", response_model=RankResponse, response_model_exclude_none=True)
async def rank(req: RankRequest, request: Request, state: State):
    run, index, ranker = state.ready()
    limits = state.limits
    snap = index.snapshot
    if len(req.history) > limits.max_history:
        raise HTTPException(413, f"history has {len(req.history)} ids; the limit is {limits.max_history}")
    if req.candidates is not None and len(req.candidates) > limits.max_candidates:
        raise HTTPException(413, f"{len(req.candidates)} candidates; the limit is {limits.max_candidates}")
    history = _dedupe(req.history)
    unknown = [i for i in history + (req.candidates or []) if i not in snap.index]
    if unknown:
        raise HTTPException(404, {"message": "unknown news ids", "unknown_ids": _dedupe(unknown)[:100]})
    hist_rows = np.array([snap.index[i] for i in history], dtype=np.int64)
    dropped = 0
    retrieved = side = None
    if req.candidates is None:  # the whole live pool: retrieval, else the freshest news
        retrieved, side = snap.retrieve_side(hist_rows)
    if retrieved is not None and len(retrieved):
        cand_rows = retrieved  # with the proxy's side-path features of them (side), or None
    elif req.candidates is None:
        side, seen = None, set(hist_rows.tolist())
        fresh = [r for r in snap.fresh[: limits.fresh_candidates + len(seen)] if r not in seen]
        cand_rows = np.array(fresh[: limits.fresh_candidates], dtype=np.int64)
    else:
        cands = _dedupe(req.candidates)
        dropped = len(req.candidates) - len(cands)
        cand_rows = np.array([snap.index[i] for i in cands], dtype=np.int64)
    if len(cand_rows) == 0:
        return RankResponse(ranked=[], history_used=0, candidates=0, note="no candidates")
    work = asyncio.ensure_future(
        ranker.rank(snap, hist_rows, cand_rows, req.top_k, req.explain, req.diversity, side)
    )
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():  # the client left: the worker drops the job unscored
        work.cancel()
        return Response(status_code=499)
    gone.cancel()
    try:
        out = work.result()
    except Busy as e:
        return JSONResponse(status_code=503, content={"detail": f"busy: {e}"}, headers={"Retry-After": "1"})
    except FloatingPointError as e:
        return JSONResponse(status_code=503, content={"detail": str(e)})
    used = hist_rows[-ranker.max_history :]
    rest = {"history_used": len(used), "candidates": len(cand_rows), "duplicates_dropped": dropped}
    if len(used) == 0:
        rest["note"] = "empty history: scores are a candidate-only prior"
    # the ranked list was encoded by the worker: the event loop only joins the pieces
    body = b'{"ranked":' + out.ranked_json + b"," + json.dumps(rest)[1:].encode()
    return Response(body, media_type="application/json")


@router.post("/news", response_model=NewsAdded)
def add_news(batch: NewsBatch | list[NewsItem], state: State):
    run, index, _ = state.ready()
    items = batch.news if isinstance(batch, NewsBatch) else batch
    if len(items) > state.limits.max_news_per_post:
        raise HTTPException(
            413, f"{len(items)} news in one request; the limit is {state.limits.max_news_per_post}"
        )
    items = list({it.id: it for it in items}.values())  # a repeated id: the last one wins
    if not items:
        return NewsAdded(added=0, updated=0, store_size=len(index.snapshot.index))
    info = [it.record() for it in items]
    with index.lock:
        known = sum(1 for it in items if it.id in index.index)
        try:
            store = index.store.append(
                [it.id for it in items], [it.title for it in items], run.encoding, info=info
            )
        except StoreError as e:
            return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": "5"})
        except OSError as e:  # nothing was committed: the store is as it was
            full = e.errno in DISK_FULL
            msg = f"the store could not be written ({e.strerror or e}); nothing was added"
            return JSONResponse(status_code=507 if full else 503, content={"detail": msg})
        index.update(store)
    return NewsAdded(added=len(items) - known, updated=known, store_size=len(index.snapshot.index))


QueryIds = Annotated[
    list[Annotated[str, StringConstraints(max_length=100 * ID_MAX)]] | None, Query(max_length=2000)
]


@router.get("/news", response_model=list[NewsInfo])
def get_news(state: State, ids: QueryIds = None) -> list[NewsInfo]:
    """`?ids=N1&ids=N2`: each value is one id (a value holding commas is also read as a list)."""
    _, index, _ = state.ready()
    snap = index.snapshot
    wanted: list[str] = []
    for v in ids or []:
        wanted += [v] if v in snap.index or "," not in v else [i for i in v.split(",") if i]
    out = []
    for nid in _dedupe(wanted):
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


@router.get("/users")
def users(state: State, limit: Annotated[int, Query(ge=0, le=1000)] = 200) -> list[dict]:
    return state.users[:limit]


@router.get("/")
def page() -> FileResponse:
    return FileResponse(static_dir() / "index.html")
