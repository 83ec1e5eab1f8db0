"""NPA (Wu et al., KDD 2019): personalised attention with user-id queries.

Shape letters: B users, C candidates, M history, L title tokens, E input width, F filters,
U user-embedding width, Q query width. A user-id embedding e_u gives a word query
q_w = ReLU(W_w e_u) and a news query q_d = ReLU(W_d e_u). News: with `word_encoder`, word
embeddings -> CNN -> attention over words with q_w (the original); otherwise the BERT [CLS]
vector projected to F. User: attention over the clicked news with q_d. Score: <user, news>.
Unknown users use id 0, a learned "unknown user" embedding, trained by replacing user ids
with 0 at rate `user_dropout` (the paper does not say; this keeps test-time users scorable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.layers import AdditiveAttention, TitleCNN, flatten_news
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class NPAConfig:
    dim: int = 384  # E (set from the encoder)
    word_encoder: bool = False
    filters: int = 400  # F
    window: int = 3
    user_dim: int = 50  # U
    query_dim: int = 200  # Q
    user_dropout: float = 0.1
    num_users: int = 0  # training users (set from the data); id 0 = unknown
    dropout: float = 0.2


class NPAState:
    def __init__(self, user: torch.Tensor, word_query: torch.Tensor) -> None:
        self.user, self.word_query = user, word_query  # [B, F], [B, Q]


class NPA(Recommender):
    name = "npa"

    def __init__(self, cfg: NPAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bias = nn.Parameter(torch.zeros(()))  # calibrates pointwise BCE; cancels under softmax
        F, Q = cfg.filters, cfg.query_dim
        self.needs_history_tokens = cfg.word_encoder
        self.needs_candidate_tokens = cfg.word_encoder
        self.drop = nn.Dropout(cfg.dropout)
        self.user_emb = nn.Embedding(cfg.num_users + 1, cfg.user_dim)
        self.word_query = nn.Linear(cfg.user_dim, Q)
        self.news_query = nn.Linear(cfg.user_dim, Q)
        if cfg.word_encoder:
            self.cnn = TitleCNN(cfg.dim, F, cfg.window, cfg.dropout)
            self.word_pool = AdditiveAttention(F, Q)
        else:
            self.in_proj = nn.Linear(cfg.dim, F)
        self.news_pool = AdditiveAttention(F, Q)

    def news_vectors(self, news: NewsRepr, q_w: torch.Tensor) -> torch.Tensor:
        """[B, K, ...] and word queries [B, Q] -> [B, K, F]."""
        if not self.cfg.word_encoder:
            return self.in_proj(self.drop(news.cls))
        x, m, lead = flatten_news(news.tokens, news.mask)
        q = q_w.repeat_interleave(lead[1], dim=0)  # one query per news, from its user
        return self.word_pool(self.cnn(self.drop(x), m), m, query=q).view(*lead, -1)

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> NPAState:
        B = hist_mask.shape[0]
        if users is None:
            users = torch.zeros(B, dtype=torch.long, device=hist_mask.device)
        users = users.clamp(max=self.cfg.num_users)
        if self.training and self.cfg.user_dropout > 0:
            users = torch.where(torch.rand(B, device=users.device) < self.cfg.user_dropout, 0, users)
        e = self.user_emb(users)  # [B, U]
        q_w, q_d = torch.relu(self.word_query(e)), torch.relu(self.news_query(e))
        h = self.news_vectors(hist, q_w)  # [B, M, F]
        return NPAState(self.news_pool(h, hist_mask, query=q_d), q_w)

    def score_candidates(self, state: NPAState, cand: NewsRepr) -> torch.Tensor:
        return (self.news_vectors(cand, state.word_query) * state.user[:, None, :]).sum(-1) + self.bias
