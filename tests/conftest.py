"""Shared offline fixtures: a tiny random BERT with its own vocabulary, and small planted splits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own store cache, never the user's."""
    monkeypatch.setenv("RMBERT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from rmbert.data.words import FILLERS, TOPICS
    from rmbert.encoders.bert import save_tiny_encoder

    words = [w for subs in TOPICS.values() for ws in subs.values() for w in ws] + FILLERS
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), words, hidden=32, layers=2)


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> Path:
    from rmbert.data.synth import SynthConfig, synth

    out = tmp_path_factory.mktemp("planted")
    synth(out, SynthConfig(users=60, seed=3))
    return out


def write_split(
    folder: Path, news: list[str], behaviors: list[str], newline: str = "\n", bom: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "\ufeff" if bom else ""
    (folder / "news.tsv").write_text(prefix + newline.join(news) + newline, encoding="utf-8", newline="")
    (folder / "behaviors.tsv").write_text(newline.join(behaviors) + newline, encoding="utf-8", newline="")
    return folder


def news_line(nid: str, title: str, cat: str = "sports", abstract: str = "") -> str:
    return f"{nid}\t{cat}\tsub\t{title}\t{abstract}\thttps://x/{nid}\t[]\t[]"


@pytest.fixture(scope="session")
def served(tiny_encoder, planted, tmp_path_factory) -> Path:
    """A trained run with every serving-relevant switch on (mean pooling, standardisation, news
    features, the click product path) and a store encoded from the dev news by `rmbert encode`:
    serving must reproduce exactly what evaluation computes."""
    from rmbert.cli import main
    from rmbert.config import apply_overrides, preset
    from rmbert.train import train

    tmp = tmp_path_factory.mktemp("serve")
    cfg = apply_overrides(
        preset("paper"),
        [
            f"encoder.name={tiny_encoder}",
            "encoder.max_title_len=12",
            "encoder.pooling=mean",
            "encoder.standardize=true",
            "features.category=true",
            "features.subcategory=true",
            "features.entities=true",
            "features.min_count=1",
            "features.history_position=true",
            "rmbert.click_product=true",
            "rmbert.similarity=true",
            "rmbert.similarity_heads=2",
            "rmbert.feature_match=true",
            "rmbert.content_match=true",
            "rmbert.wide=true",
            "rmbert.field_affinity=true",
            "rmbert.steps=3",
            "train.epochs=1",
            "train.batch_size=8",
            "train.checkpoint_every=0",
        ],
    )
    train(cfg, planted / "train", tmp / "run", planted / "dev", progress=False)
    news = str(planted / "dev" / "news.tsv")
    assert main(["--quiet", "encode", str(tmp / "run"), "--news", news, "--out", str(tmp / "store")]) == 0
    return tmp


@pytest.fixture
def client(served, tmp_path, planted):
    from fastapi.testclient import TestClient

    from rmbert.serve.app import Limits, create_app
    from rmbert.serve.retrieval import RetrievalConfig

    store = tmp_path / "store"
    shutil.copytree(served / "store", store)  # each test may append to its own copy
    app = create_app(
        served / "run",
        store,
        behaviors=planted / "dev" / "behaviors.tsv",
        limits=Limits(
            max_history=60,
            max_candidates=30,
            fresh_candidates=5,
            max_news_per_post=3,
            retrieval=RetrievalConfig(top_n=0),
        ),
    )
    with TestClient(app) as c:
        c.store_path = store
        yield c


def assert_encoded_once_as_each_slot(run_dir: Path, split_dir: Path) -> None:
    """`Recommender.encodes_news`: a batch's distinct news go through the model's news encoder
    once and are gathered to their slots; logits and gradients (eval mode) equal encoding every
    slot on its own. In training each distinct news then gets one dropout mask per batch."""
    import numpy as np
    import torch

    from rmbert.data.mind import load_split
    from rmbert.run import load_run

    run = load_run(run_dir)
    split = load_split(split_dir)
    batch = run.batcher(split, run.store([split], progress=False)).batch(np.arange(8))
    net = run.model.eval()
    assert net.rec.encodes_news
    calls = []
    encode = net.rec.encode_news
    net.rec.encode_news = lambda news: calls.append(tuple(news.cls.shape[:2])) or encode(news)

    def logits_and_grads():
        net.zero_grad(set_to_none=True)
        logits = net(batch)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    once, g_once = logits_and_grads()
    rows = np.concatenate([batch.hist.numpy().ravel(), batch.cand.numpy().ravel()])
    distinct = len(np.unique(rows))
    assert calls == [(1, distinct)] and distinct < len(rows)
    net.rec.encodes_news = False  # the instance only: every slot encoded on its own
    each, g_each = logits_and_grads()
    assert calls[1:] == [tuple(batch.hist.shape), tuple(batch.cand.shape)]
    torch.testing.assert_close(once, each, rtol=1e-5, atol=1e-5)
    assert g_once.keys() == g_each.keys() and len(g_once) > 3
    for n in g_once:
        torch.testing.assert_close(g_once[n], g_each[n], rtol=1e-4, atol=1e-5, msg=n)
