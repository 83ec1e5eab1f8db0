"""NAML (Wu et al., IJCAI 2019): attentive multi-view news encoder, additive-attention user encoder.

Shape letters: B users, C candidates, M history, L title tokens, A abstract tokens, E word width,
F filters, Q query width, G category embedding width.

News, four views of F each:
    title        word vectors -> CNN (window `window`, ReLU) -> additive attention over words
    abstract     word vectors -> its own CNN -> its own additive attention
    category     embedding [G] -> dense (ReLU) -> [F]
    subcategory  embedding [G] -> dense (ReLU) -> [F]
then view attention: a_v = softmax_v(q . tanh(U r_v + u)), news = sum_v a_v r_v.
User: additive attention over the clicked news. Score: <user, news>.

Word vectors are the news side's: in encoder mode "words", WordPiece embeddings initialised from
BERT's input embeddings and trained (the original used GloVe); title tokens come as the news
side's token vectors, the abstract (which the news store does not hold) as token ids tokenized
with the run's tokenizer when the model is built for a split (side table `abstract`, A =
`abstract_len` tokens), embedded by the same word embeddings. The original read the news body;
MIND gives abstracts, which is what NAML reads on MIND. Unknown categories (id 0) have a learned
embedding; an empty abstract's view is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.models.layers import AdditiveAttention, TitleCNN, flatten_news
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class NAMLConfig:
    dim: int = 384  # E: the news side's word width (set from the encoder)
    filters: int = 400  # F
    window: int = 3
    query_dim: int = 200  # Q
    category_dim: int = 100  # G
    abstract_len: int = 50  # A: abstract tokens read
    dropout: float = 0.2
    # resolved from the data
    num_categories: int = 0  # categories + 1 (0 = unknown)
    num_subcategories: int = 0


class TextView(nn.Module):
    """Word vectors [N, T, E], mask [N, T] -> CNN -> additive attention -> [N, F] (zeros if empty)."""

    def __init__(self, dim: int, filters: int, window: int, query_dim: int, dropout: float) -> None:
        super().__init__()
        self.cnn = TitleCNN(dim, filters, window, dropout)
        self.pool = AdditiveAttention(filters, query_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.cnn(self.drop(x), mask), mask)


class NAML(Recommender):
    name = "naml"
    encodes_news = True
    needs_history_tokens = True
    side_inputs = ("category", "subcategory", "abstract")
    word_inputs = ("abstract",)

    def __init__(self, cfg: NAMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        F = cfg.filters
        self.bias = nn.Parameter(torch.zeros(()))  # calibrates pointwise BCE; cancels under softmax
        self.title = TextView(cfg.dim, F, cfg.window, cfg.query_dim, cfg.dropout)
        self.abstract = TextView(cfg.dim, F, cfg.window, cfg.query_dim, cfg.dropout)
        self.cat = nn.Embedding(max(cfg.num_categories, 1), cfg.category_dim)
        self.sub = nn.Embedding(max(cfg.num_subcategories, 1), cfg.category_dim)
        self.cat_dense = nn.Linear(cfg.category_dim, F)
        self.sub_dense = nn.Linear(cfg.category_dim, F)
        self.view_pool = AdditiveAttention(F, cfg.query_dim)
        self.user_pool = AdditiveAttention(F, cfg.query_dim)

    def encode_news(self, news: NewsRepr) -> torch.Tensor:
        """[B, K, ...] -> [B, K, F]."""
        assert news.tokens is not None and news.mask is not None and news.extra is not None
        x, m, lead = flatten_news(news.tokens, news.mask)
        a, am, _ = flatten_news(news.extra["abstract"], news.extra["abstract_mask"])
        views = [
            self.title(x, m),
            self.abstract(a, am),
            torch.relu(self.cat_dense(self.cat(news.extra["category"].reshape(-1)))),
            torch.relu(self.sub_dense(self.sub(news.extra["subcategory"].reshape(-1)))),
        ]
        v = torch.stack(views, 1)  # [BK, 4, F]
        return self.view_pool(v, torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)).view(*lead, -1)

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.user_pool(self.encoded(hist), hist_mask)  # [B, F]; zeros for an empty history

    def score_candidates(self, state: torch.Tensor, cand: NewsRepr) -> torch.Tensor:
        return (self.encoded(cand) * state[:, None, :]).sum(-1) + self.bias
