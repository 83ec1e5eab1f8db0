"""DCN, Deep & Cross Network (Wang et al., ADKDD 2017): explicit feature crosses beside a DNN.

Shape letters: B users, C candidates, M history, L title tokens, E token width, K field width,
F = 8 fields, X = F * K the stacked input, H hidden width.
The input is the RMBERT paper's for CTR baselines (its §3.1.2; models/fields.py): ID fields of the
user, the candidate, its category and subcategory, the clicked news' ID embeddings averaged into
three user-side fields (no sequence model), and the TF-IDF-weighted title tokens as one field.
Unknown users (id 0, e.g. at test time) read a learned "unknown user" embedding, trained by
replacing user ids with 0 at rate `id_dropout`; the same for news.

    x_0 = [e_1; ...; e_F]                                  [X]
    x_{l+1} = x_0 (x_l . w_l) + b_l + x_l                  cross network, `cross` layers
    h = DNN(x_0)                                           deep network (H per layer, ReLU)
    y = w . [x_L; h] + b                                   combination layer
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.deepfm import mlp
from rmbert.models.fields import FIELDS, FieldState, IDFields
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class DCNConfig:
    dim: int = 384  # E: the news side's token width (set from the encoder)
    field_dim: int = 10  # K
    cross: int = 3  # cross layers
    hidden: int = 400  # H
    layers: int = 2  # deep layers
    dropout: float = 0.2
    id_dropout: float = 0.1  # training user and news ids replaced by 0 (unknown) at this rate
    # resolved from the data and the encoder
    num_users: int = 0  # training users; id 0 = unknown
    num_news: int = 0  # training news + 1 (0 = unknown)
    num_categories: int = 0
    num_subcategories: int = 0
    vocab_size: int = 0  # V: the WordPiece vocabulary (the IDF table)


class DCN(Recommender):
    name = "dcn"
    side_inputs = ("news_id", "category", "subcategory", "title_ids")

    def __init__(self, cfg: DCNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fields = IDFields.from_config(cfg, first_order=False)
        X = len(FIELDS) * cfg.field_dim
        self.cross_w = nn.Parameter(torch.randn(cfg.cross, X) * X**-0.5)  # w_l
        self.cross_b = nn.Parameter(torch.zeros(cfg.cross, X))  # b_l
        self.deep = mlp(X, cfg.hidden, cfg.layers, cfg.dropout)
        self.out = nn.Linear(X + cfg.hidden, 1)

    def fit_training_news(self, vocab, tables: dict[str, np.ndarray]) -> None:
        self.fields.fit_idf(tables["title_ids"])

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> FieldState:
        return self.fields.user_fields(hist, hist_mask, users)

    def score_candidates(self, state: FieldState, cand: NewsRepr) -> torch.Tensor:
        x0 = self.fields.fields(state, cand)[0].flatten(2)  # [B, C, X]
        x = x0
        for w, b in zip(self.cross_w, self.cross_b):
            x = x0 * (x @ w)[..., None] + b + x
        return self.out(torch.cat([x, self.deep(x0)], -1))[..., 0]  # [B, C]
