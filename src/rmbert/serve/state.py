"""The serving state, typed, and the dependency that hands it to route handlers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from rmbert.run import LoadedRun
from rmbert.serve.index import ServingIndex
from rmbert.serve.ranker import Ranker
from rmbert.serve.retrieval import RetrievalConfig


@dataclass(frozen=True)
class Limits:
    max_history: int = 500  # ids per request (the model reads the most recent train.max_history)
    max_candidates: int = 2000
    fresh_candidates: int = 100  # candidates when the request gives none (and retrieval finds none)
    # the retrieval stage (serve/retrieval.py) of a /rank without candidates: its top_n news from the
    # whole live pool are re-ranked (top_n 0: the freshest `fresh_candidates` news instead); its
    # max_history is the run's
    retrieval: RetrievalConfig = RetrievalConfig()
    max_news_per_post: int = 2000
    max_batch: int = 8  # /rank requests scored in one forward; small keeps the latency tail short
    max_body_bytes: int = 4 << 20  # request bodies above this are refused (413) before parsing
    max_queue: int = 64  # /rank requests waiting for the worker; more get 503 + Retry-After
    queue_timeout_s: float = 10.0  # a request still waiting after this gets 503 and is not scored
    store_poll_s: float = 2.0  # how often to look for segments other writers added (0 = never)
    device: str = "cpu"  # where the model scores (cuda: each batch is moved there)
    # torch threads of the inference worker (0: torch's default, one per core). A batch of a few
    # requests is many small ops, which one thread runs faster than two (2 cores: re-ranking 200
    # news 7.7 ms on one thread, 12.2 ms on two), and the other cores stay free for the next
    # requests' retrieval; raise it for large batches (many concurrent users) on many cores
    worker_threads: int = 1
    # the serving index holds each news's products as a click (`InferenceForm.click_terms`), so
    # a request gathers its clicks' instead of computing them: the default RMBERT's are 18 KB a
    # news (a quarter more memory); re-ranking 200 for a user with 20 clicks took 8.6 -> 5.6 ms
    # on this machine's one worker thread (docs/benchmarks.md); only where the model scores on
    # the CPU (a GPU computes them at once, and they would cross to it with every batch)
    click_terms: bool = True


@dataclass
class ServingState:
    limits: Limits
    run: LoadedRun | None = None
    index: ServingIndex | None = None
    ranker: Ranker | None = None
    users: list[dict] = field(default_factory=list)
    problem: str | None = None  # why the service cannot rank (e.g. a model with non-finite weights)

    def ready(self) -> tuple[LoadedRun, ServingIndex, Ranker]:
        if self.problem or self.run is None or self.index is None or self.ranker is None:
            raise HTTPException(503, f"the service cannot rank: {self.problem or 'not loaded'}")
        return self.run, self.index, self.ranker


async def get_state(request: Request) -> ServingState:
    """async on purpose: FastAPI runs a plain `def` dependency in its thread pool, one thread hop
    per request on the /rank path."""
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_state)]


def static_dir() -> Path:
    return Path(__file__).parent / "static"
