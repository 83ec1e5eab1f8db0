"""Shared offline fixtures: a tiny random BERT with its own vocabulary, and small planted splits."""

from __future__ import annotations

import os
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
