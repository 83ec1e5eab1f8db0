"""LSTUR (An et al., ACL 2019): long- and short-term user representations.

Shape letters: B users, C candidates, M history, L title tokens, E input width, F filters.
News: with `word_encoder`, word embeddings -> CNN -> additive attention (the original, without
its topic embeddings); otherwise the BERT [CLS] vector projected to F. Short-term user: a GRU
over the clicked news in order. Long-term user: a user-id embedding, combined by `ini` (the
GRU's initial state) or `con` (concatenated, then a dense layer, as Microsoft Recommenders do).
Unknown users (id 0, e.g. at test time) get a zero long-term vector; as in the paper, training
masks the long-term vector with probability `user_mask_prob` so the model works without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.layers import AdditiveAttention, TitleCNN, flatten_news
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class LSTURConfig:
    dim: int = 384  # E (set from the encoder)
    word_encoder: bool = False
    filters: int = 300  # F
    window: int = 3
    query_dim: int = 200
    combine: str = "ini"  # ini | con
    user_mask_prob: float = 0.5
    num_users: int = 0  # training users (set from the data); id 0 = unknown
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.combine not in ("ini", "con"):
            raise ValueError(f"lstur.combine must be ini or con, not {self.combine!r}")


class LSTUR(Recommender):
    name = "lstur"
    encodes_news = True

    def __init__(self, cfg: LSTURConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bias = nn.Parameter(torch.zeros(()))  # calibrates pointwise BCE; cancels under softmax
        F = cfg.filters
        self.needs_history_tokens = cfg.word_encoder
        self.needs_candidate_tokens = cfg.word_encoder
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.word_encoder:
            self.cnn = TitleCNN(cfg.dim, F, cfg.window, cfg.dropout)
            self.pool = AdditiveAttention(F, cfg.query_dim)
        else:
            self.in_proj = nn.Linear(cfg.dim, F)
        self.user_emb = nn.Embedding(cfg.num_users + 1, F, padding_idx=0)
        self.gru = nn.GRU(F, F, batch_first=True)
        if cfg.combine == "con":
            self.combine = nn.Linear(2 * F, F)

    def encode_news(self, news: NewsRepr) -> torch.Tensor:
        if not self.cfg.word_encoder:
            return self.in_proj(self.drop(news.cls))
        x, m, lead = flatten_news(news.tokens, news.mask)
        return self.pool(self.cnn(self.drop(x), m), m).view(*lead, -1)

    def long_term(self, users: torch.Tensor | None, B: int, device) -> torch.Tensor:
        if users is None:
            return torch.zeros(B, self.cfg.filters, device=device)
        u = self.user_emb(users.clamp(max=self.cfg.num_users))  # [B, F]
        if self.training and self.cfg.user_mask_prob > 0:
            keep = torch.rand(B, 1, device=u.device) >= self.cfg.user_mask_prob
            u = u * keep
        return u

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.encoded(hist)  # [B, M, F]
        B = h.shape[0]
        long = self.long_term(users, B, h.device)  # [B, F]
        lengths = hist_mask.sum(1)
        # move the clicked news to the front, in order, so the GRU reads no padding
        order = torch.sort((~hist_mask).to(torch.int8), dim=1, stable=True).indices
        h = torch.gather(h, 1, order[..., None].expand_as(h))
        h0 = long[None] if self.cfg.combine == "ini" else torch.zeros_like(long)[None]
        packed = nn.utils.rnn.pack_padded_sequence(
            h, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, hT = self.gru(packed, h0.contiguous())
        short = torch.where((lengths > 0)[:, None], hT[0], h0[0])  # an empty history keeps the initial state
        if self.cfg.combine == "con":
            return self.combine(torch.cat([short, long], dim=-1))
        return short

    def score_candidates(self, state: torch.Tensor, cand: NewsRepr) -> torch.Tensor:
        return (self.encoded(cand) * state[:, None, :]).sum(-1) + self.bias
