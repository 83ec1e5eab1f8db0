"""NRMS (Wu et al., EMNLP 2019): multi-head self-attention news and user encoders, dot-product click.

Shape letters: B users, C candidates, M history, L title tokens, E input width, F = heads * head_dim.
News: with `word_encoder`, word embeddings -> self-attention -> additive attention (the original);
otherwise the BERT [CLS] vector projected to F (the PLM-NR style). User: self-attention over the
clicked news -> additive attention. Score: <user, news>.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.layers import AdditiveAttention, flatten_news
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class NRMSConfig:
    dim: int = 384  # E: the news side's width (set from the encoder)
    word_encoder: bool = False  # the original word-level news encoder (encoder mode "words")
    heads: int = 16
    head_dim: int = 16
    query_dim: int = 200
    dropout: float = 0.2


def self_attend(mha: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked self-attention [N, K, F]; rows with nothing unmasked attend to position 0 (later masked)."""
    pad = ~mask
    pad[:, 0] &= mask.any(1)  # avoid all-masked rows (NaN); their output is ignored downstream
    return mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


class NRMS(Recommender):
    name = "nrms"
    encodes_news = True

    def __init__(self, cfg: NRMSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bias = nn.Parameter(torch.zeros(()))  # calibrates pointwise BCE; cancels under softmax
        F = cfg.heads * cfg.head_dim
        self.needs_history_tokens = cfg.word_encoder
        self.needs_candidate_tokens = cfg.word_encoder
        self.in_proj = nn.Linear(cfg.dim, F)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.word_encoder:
            self.word_attn = nn.MultiheadAttention(F, cfg.heads, batch_first=True)
            self.word_pool = AdditiveAttention(F, cfg.query_dim)
        self.news_attn = nn.MultiheadAttention(F, cfg.heads, batch_first=True)
        self.news_pool = AdditiveAttention(F, cfg.query_dim)

    def encode_news(self, news: NewsRepr) -> torch.Tensor:
        """[B, K, ...] -> [B, K, F]."""
        if not self.cfg.word_encoder:
            return self.in_proj(self.drop(news.cls))
        x, m, lead = flatten_news(news.tokens, news.mask)
        h = self.drop(self_attend(self.word_attn, self.in_proj(self.drop(x)), m))
        return self.word_pool(h, m).view(*lead, -1)

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.encoded(hist)  # [B, M, F]
        h = self.drop(self_attend(self.news_attn, h, hist_mask))
        return self.news_pool(h, hist_mask)  # [B, F]; zeros for an empty history

    def score_candidates(self, state: torch.Tensor, cand: NewsRepr) -> torch.Tensor:
        return (self.encoded(cand) * state[:, None, :]).sum(-1) + self.bias
