"""`--model` names -> recommenders, and the full model (news side + recommender) trained as one module."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rmbert.config import RunConfig
from rmbert.data.batching import Batch
from rmbert.encoders.news import NewsSide
from rmbert.models.base import Recommender
from rmbert.models.lstur import LSTUR
from rmbert.models.npa import NPA
from rmbert.models.nrms import NRMS
from rmbert.models.rmbert import RMBERT

MODELS: dict[str, type[Recommender]] = {"rmbert": RMBERT, "nrms": NRMS, "lstur": LSTUR, "npa": NPA}


def resolve(cfg: RunConfig, dim: int, num_users: int) -> RunConfig:
    """Fill in what comes from the encoder (D) and the data (number of training users)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if cfg.encoder.mode == "words" and cfg.model == "rmbert":
        raise ValueError(
            "encoder mode 'words' is for baselines' own news encoders; RMBERT w/o BERT is mode 'lstm'"
        )
    words = cfg.encoder.mode == "words"
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
    """News side + recommender: store rows in, click logits [B, C] out."""

    def __init__(self, news: NewsSide, rec: Recommender) -> None:
        super().__init__()
        self.news = news
        self.rec = rec

    def forward(self, batch: Batch) -> torch.Tensor:
        hist, cand = self.news(batch.hist, batch.cand, self.rec.needs_history_tokens)
        return self.rec(hist, batch.hist_mask, cand, batch.users)
