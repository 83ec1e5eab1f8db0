"""DeepFM (Guo et al., IJCAI 2017): a factorization machine and a DNN over shared field embeddings.

Shape letters: B users, C candidates, M history, L title tokens, E token width, K field width,
F = 8 fields, H hidden width.
The fields (models/fields.py) are the RMBERT paper's setup for CTR baselines (its §3.1.2): ID
features (user, candidate news, category, subcategory), the clicked news' ID embeddings averaged
into three user-side fields (no sequence model), and the TF-IDF of the title's WordPiece tokens as
the handcrafted feature. Unknown users (id 0, e.g. at test time) read a learned "unknown user"
embedding, trained by replacing user ids with 0 at rate `id_dropout`; the same for news.

    y = b + sum_i w_i x_i                                  first order
          + 1/2 sum_k [(sum_i v_ik x_i)^2 - sum_i (v_ik x_i)^2]   FM: every pair <v_i, v_j> x_i x_j
          + DNN([e_1; ...; e_F])                           deep part (H-H-H, ReLU, dropout)

where the title's features are its tokens (value: TF-IDF, embedding P x_l), each its own x_i in
the FM, and their weighted sum one field e_title in the DNN. The paper's DNN was 400-400-400
with dropout 0.5 and K = 10, the defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.fields import FIELDS, FieldState, IDFields
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class DeepFMConfig:
    dim: int = 384  # E: the news side's token width (set from the encoder)
    field_dim: int = 10  # K
    hidden: int = 400  # H
    layers: int = 3
    dropout: float = 0.5
    id_dropout: float = 0.1  # training user and news ids replaced by 0 (unknown) at this rate
    # resolved from the data and the encoder
    num_users: int = 0  # training users; id 0 = unknown
    num_news: int = 0  # training news + 1 (0 = unknown)
    num_categories: int = 0
    num_subcategories: int = 0
    vocab_size: int = 0  # V: the WordPiece vocabulary (the IDF table)


def mlp(inp: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """`layers` x (Linear -> ReLU -> Dropout) of width `hidden` (DeepFM's and DCN's deep parts)."""
    out: list[nn.Module] = []
    for i in range(layers):
        out += [nn.Linear(inp if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*out)


class DeepFM(Recommender):
    name = "deepfm"
    side_inputs = ("news_id", "category", "subcategory", "title_ids")

    def __init__(self, cfg: DeepFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fields = IDFields.from_config(cfg)
        self.bias = nn.Parameter(torch.zeros(()))
        self.deep = mlp(len(FIELDS) * cfg.field_dim, cfg.hidden, cfg.layers, cfg.dropout)
        self.out = nn.Linear(cfg.hidden, 1)

    def fit_training_news(self, vocab, tables: dict[str, np.ndarray]) -> None:
        self.fields.fit_idf(tables["title_ids"])

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> FieldState:
        return self.fields.user_fields(hist, hist_mask, users)

    def score_candidates(self, state: FieldState, cand: NewsRepr) -> torch.Tensor:
        f, first, title_sq = self.fields.fields(state, cand)  # [B, C, F, K], [B, C], [B, C, K]
        square = (f[:, :, :-1] ** 2).sum(2) + title_sq  # sum_i (v_i x_i)^2, the title token by token
        fm = 0.5 * (f.sum(2) ** 2 - square).sum(-1)  # [B, C]
        deep = self.out(self.deep(f.flatten(2)))[..., 0]  # [B, C]
        return self.bias + first + fm + deep
