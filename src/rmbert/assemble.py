"""From a config to a ready model, in one place: encoder, news store, feature vocabulary,
recommender, and the full model that trains as one module.

It sits one floor above config, data, encoders and models and imports only downward;
`run.py` (run-folder input and output) and the training, evaluation and serving code above it
build every model through here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmbert.config import RunConfig
from rmbert.data.batching import Batch
from rmbert.data.mind import News, Split
from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
from rmbert.encoders.news import STORE_KIND, NewsSide, make_encoder
from rmbert.encoders.store import Encoding, NewsStore, cached_store
from rmbert.models.base import Recommender
from rmbert.models.features import FeatureVocab, NewsFeatures
from rmbert.models.lstur import LSTUR
from rmbert.models.npa import NPA
from rmbert.models.nrms import NRMS
from rmbert.models.rmbert import RMBERT
from rmbert.types import NewsRepr

MODELS: dict[str, type[Recommender]] = {"rmbert": RMBERT, "nrms": NRMS, "lstur": LSTUR, "npa": NPA}


def resolve(cfg: RunConfig, dim: int, num_users: int, vocab: FeatureVocab | None = None) -> RunConfig:
    """Fill in what comes from the encoder (D) and the data (training users, feature vocabulary)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if cfg.encoder.mode == "words" and cfg.model == "rmbert":
        raise ValueError(
            "encoder mode 'words' is for baselines' own news encoders; RMBERT w/o BERT is mode 'lstm'"
        )
    words = cfg.encoder.mode == "words"
    if cfg.features.any and vocab is not None:
        cfg = cfg.override({f"features.{k}": v for k, v in vocab.sizes().items()})
    if cfg.features.history_position:
        cfg = cfg.override({"features.max_history": cfg.train.max_history})
    out = {"rmbert.dim": dim}
    for m in ("nrms", "lstur", "npa"):
        out |= {f"{m}.dim": dim, f"{m}.word_encoder": words}
    return cfg.override(out | {"lstur.num_users": num_users, "npa.num_users": num_users})


def build_recommender(cfg: RunConfig) -> Recommender:
    return MODELS[cfg.model](getattr(cfg, cfg.model))


class NewsRecModel(nn.Module):
    """News side (+ optional news features) + recommender: store rows in, click logits [B, C] out.

    With features, `feature_ids` [rows, F] holds each store row's feature ids (row 0, the null
    news, all zero); `set_feature_ids` installs it with the store it belongs to."""

    def __init__(self, news: NewsSide, rec: Recommender, features: NewsFeatures | None = None) -> None:
        super().__init__()
        self.news = news
        self.rec = rec
        self.features = features
        self.feature_ids: torch.Tensor | None = None  # not a buffer: it belongs to the store, not the run

    def set_feature_ids(self, ids) -> None:
        self.feature_ids = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)

    def add_features(self, news: NewsRepr, rows: torch.Tensor) -> NewsRepr:
        """news.cls [B, K, D] + the features of store rows [B, K]."""
        if self.features is None:
            return news
        if self.feature_ids is None:
            raise RuntimeError("this model reads news features: call set_feature_ids first")
        ids = self.feature_ids.to(rows.device)[rows]  # [B, K, F]
        return dataclasses.replace(news, cls=news.cls + self.features(ids))

    def add_history_features(self, hist: NewsRepr, batch: Batch) -> NewsRepr:
        """Clicked news get their features and, with history_position, their recency embedding."""
        hist = self.add_features(hist, batch.hist)
        if self.features is None or self.features.pos is None:
            return hist
        return dataclasses.replace(hist, cls=hist.cls + self.features.positions(batch.hist_mask))

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.rec.dedup_candidates:
            hist, cand = self.news(batch.hist, batch.cand, self.rec.needs_history_tokens)
            hist, cand = self.add_history_features(hist, batch), self.add_features(cand, batch.cand)
            return self.rec(hist, batch.hist_mask, cand, batch.users)
        # each candidate news once: a news shown in several impressions of the batch shares its
        # candidate-only computation (RMBERT's query unit)
        uniq, inv = torch.unique(batch.cand, return_inverse=True)  # [U], [B, C]
        hist, cand = self.news(batch.hist, uniq[None], self.rec.needs_history_tokens)
        hist, cand = self.add_history_features(hist, batch), self.add_features(cand, uniq[None])
        cand = NewsRepr(cls=cand.cls[0], tokens=cand.tokens[0], mask=cand.mask[0], index=inv)
        return self.rec(hist, batch.hist_mask, cand, batch.users)


def load_encoder(cfg: RunConfig, tokenizer_dir: Path | None = None):
    src = str(tokenizer_dir) if tokenizer_dir is not None and tokenizer_dir.is_dir() else cfg.encoder.name
    tokenizer = load_tokenizer(src)
    encoder = BertNewsEncoder.from_pretrained(cfg.encoder.name, cfg.encoder.max_title_len)
    encoder.sep_token_id = tokenizer.sep_token_id
    return encoder, tokenizer


def split_news(*splits: Split) -> tuple[list[str], list[str]]:
    """Union of the splits' news (first title wins), in first-seen order."""
    seen: dict[str, str] = {}
    for s in splits:
        for nid, title in zip(s.news.ids, s.news.title):
            seen.setdefault(nid, title)
    return list(seen), list(seen.values())


def store_for(cfg: RunConfig, enc: Encoding, splits: list[Split], progress: bool) -> NewsStore:
    """The (cached) store of the splits' news, of the kind the encoder mode reads."""
    ids, titles = split_news(*splits)
    kind = STORE_KIND[cfg.encoder.mode]
    k = cfg.encoder.top_k if kind == "lower" else 0
    return cached_store(ids, titles, enc, kind=kind, k=k, progress=progress)


def build_model(cfg: RunConfig, encoder: BertNewsEncoder, store: NewsStore | None) -> NewsRecModel:
    enc = make_encoder(cfg.encoder.mode, encoder)
    e = cfg.encoder
    news = NewsSide(e.mode, enc, store, e.top_k, e.dedup, e.pooling)  # type: ignore[arg-type]
    features = NewsFeatures(cfg.features, encoder.dim) if cfg.features.any else None
    return NewsRecModel(news, build_recommender(cfg), features)


def feature_ids(cfg: RunConfig, vocab: FeatureVocab | None, store: NewsStore, splits: list[Split]):
    """Feature ids [store rows, F] of the splits' news (None when the run reads no features)."""
    if not cfg.features.any or vocab is None:
        return None
    F = 2 + cfg.features.max_entities
    out = np.zeros((len(store) + 1, F), np.int64)
    for split in splits:
        rows = store.rows(split.news.ids)
        ids = vocab.news_ids(split.news, cfg.features.max_entities)
        out[rows[rows > 0]] = ids[rows > 0]
    return out


@dataclass
class Built:
    """What `assemble` returns: the resolved config and everything the model needs."""

    cfg: RunConfig
    model: NewsRecModel
    store: NewsStore
    vocab: FeatureVocab | None
    encoding: Encoding


def assemble(
    cfg: RunConfig,
    splits: list[Split],
    rank: int,
    world: int,
    progress: bool,
    users: list[str],
    train_news: News,
) -> Built:
    """The model to train over `splits`: the encoder, the news store of the splits' news (rank 0
    builds it, other ranks wait and open it), the feature vocabulary fitted on `train_news`,
    the config resolved against both, and the model with seed-determined initial weights."""
    import torch.distributed as dist

    encoder, tokenizer = load_encoder(cfg)
    enc = Encoding.of(encoder, tokenizer)
    vectors = splits[0].path / "entity_embedding.vec"
    vocab = FeatureVocab.fit(train_news, cfg.features, vectors) if cfg.features.any else None
    cfg = resolve(cfg, encoder.dim, len(users), vocab)
    if rank != 0:
        dist.barrier()  # rank 0 builds the news store first; the others then open it
    store = store_for(cfg, enc, splits, progress and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    torch.manual_seed(cfg.train.seed)  # the recommender's initial weights depend on the seed only
    model = build_model(cfg, encoder, store)
    model.set_feature_ids(feature_ids(cfg, vocab, store, splits))
    if model.features is not None and vocab is not None:
        model.features.set_vectors(vocab.vectors)
    if cfg.encoder.mode == "frozen" and cfg.encoder.standardize:
        model.news.fit_standardizer(seed=cfg.train.seed)
    return Built(cfg, model, store, vocab, enc)
