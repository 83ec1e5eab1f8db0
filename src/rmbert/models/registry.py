"""`--model` names -> recommenders, and the full model (news side + recommender) trained as one module."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rmbert.config import RunConfig
from rmbert.data.batching import Batch
from rmbert.encoders.bert import NewsRepr
from rmbert.encoders.news import NewsSide
from rmbert.models.base import Recommender
from rmbert.models.features import FeatureVocab, NewsFeatures
from rmbert.models.lstur import LSTUR
from rmbert.models.npa import NPA
from rmbert.models.nrms import NRMS
from rmbert.models.rmbert import RMBERT

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
        cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, **vocab.sizes()))
    return dataclasses.replace(
        cfg,
        rmbert=dataclasses.replace(cfg.rmbert, dim=dim),
        nrms=dataclasses.replace(cfg.nrms, dim=dim, word_encoder=words),
        lstur=dataclasses.replace(cfg.lstur, dim=dim, word_encoder=words, num_users=num_users),
        npa=dataclasses.replace(cfg.npa, dim=dim, word_encoder=words, num_users=num_users),
    )


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

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.rec.dedup_candidates:
            hist, cand = self.news(batch.hist, batch.cand, self.rec.needs_history_tokens)
            hist, cand = self.add_features(hist, batch.hist), self.add_features(cand, batch.cand)
            return self.rec(hist, batch.hist_mask, cand, batch.users)
        # each candidate news once: a news shown in several impressions of the batch shares its
        # candidate-only computation (RMBERT's query unit)
        uniq, inv = torch.unique(batch.cand, return_inverse=True)  # [U], [B, C]
        hist, cand = self.news(batch.hist, uniq[None], self.rec.needs_history_tokens)
        hist, cand = self.add_features(hist, batch.hist), self.add_features(cand, uniq[None])
        cand = NewsRepr(cls=cand.cls[0], tokens=cand.tokens[0], mask=cand.mask[0], index=inv)
        return self.rec(hist, batch.hist_mask, cand, batch.users)
