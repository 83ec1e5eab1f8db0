"""`--model` names -> recommenders, and the full model (news side + recommender) trained as one module."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rmbert.config import RunConfig
from rmbert.data.batching import Batch
from rmbert.encoders.news import NewsSide
from rmbert.models.base import Recommender
from rmbert.models.rmbert import RMBERT

MODELS: dict[str, type[Recommender]] = {"rmbert": RMBERT}


def resolve(cfg: RunConfig, dim: int) -> RunConfig:
    """Fill the settings that come from the encoder (D) into the config."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    return dataclasses.replace(cfg, rmbert=dataclasses.replace(cfg.rmbert, dim=dim))


def build_recommender(cfg: RunConfig, num_users: int = 0) -> Recommender:
    if cfg.model == "rmbert":
        return RMBERT(cfg.rmbert)
    raise ValueError(f"unknown model {cfg.model!r}")


class NewsRecModel(nn.Module):
    """News side + recommender: store rows in, click logits [B, C] out."""

    def __init__(self, news: NewsSide, rec: Recommender) -> None:
        super().__init__()
        self.news = news
        self.rec = rec

    def forward(self, batch: Batch) -> torch.Tensor:
        H, cand = self.news(batch.hist, batch.cand)
        return self.rec(H, batch.hist_mask, cand, batch.users)
