"""The input fields DeepFM and DCN share: ID features plus TF-IDF of the title, as the RMBERT
paper ran these CTR models (its §3.1.2: "ID features ... and TF-IDF features as handcrafted").

Shape letters: B users, C candidates, M history, L title tokens, E token width, K field width,
V WordPiece vocabulary, F = 8 fields.

Every (user, candidate) pair gets F field vectors of width K (and a first-order weight each):

    user          E_user[u]; u = 0 is a learned "unknown user": users not seen in training (and
                  ids past the table) read it, and training replaces user ids by 0 at rate
                  `id_dropout`, so it is trained
    news          E_news[n] of the candidate; n = 0 (a news not in training: most test news) is a
                  learned "unknown news", trained the same way
    category, subcategory   E_cat, E_sub of the candidate (0 = unknown, a learned row too)
    history ×3    mean over the clicked news of E_news, E_cat, E_sub: these CTR models have no
                  sequence model, so the history enters as three user-side fields (zeros for an
                  empty history; padded slots are left out of the mean)
    title         sum_l w_l P x_l over the candidate's title tokens: x_l [E] is the news side's
                  vector of token l (its word embedding, initialised from BERT's input
                  embeddings, in encoder mode "words"), P [K, E] a learned projection (a low-rank
                  embedding of each WordPiece), w_l the token's TF-IDF

TF-IDF is over the title's WordPiece ids (the store's `input_ids`, side table `title_ids`):
idf(t) = ln((1 + N) / (1 + df(t))) + 1 over the N training news (fitted once when the model is
built for training, `fit_training_news`, and saved with the weights as the buffer `idf`; a
WordPiece no training title has gets the largest idf); tf = count / title length; the vector is
L2-normalised over the title's distinct tokens, and a token occurring twice carries its value
split over its occurrences (w_l = idf / length / norm), so sum_l w_l P x_l is the TF-IDF-weighted
sum of the distinct tokens' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmbert.models.tables import idf_weights
from rmbert.types import NewsRepr

FIELDS = (
    "user",
    "news",
    "category",
    "subcategory",
    "hist_news",
    "hist_category",
    "hist_subcategory",
    "title",
)


@dataclass
class FieldState:
    """The user side of the fields: user, hist_news, hist_category, hist_subcategory."""

    vectors: torch.Tensor  # [B, 4, K]
    first: torch.Tensor  # [B] their first-order weights, summed (zeros without first-order terms)


class IDFields(nn.Module):
    """Users, clicked news and candidates -> the F field vectors of every pair."""

    def __init__(
        self,
        dim: int,
        field_dim: int,
        num_users: int,
        num_news: int,
        num_categories: int,
        num_subcategories: int,
        vocab_size: int,
        id_dropout: float,
        first_order: bool = True,
    ) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError("the WordPiece vocabulary size (vocab_size) is resolved from the encoder")
        self.num_users, self.num_news, self.id_dropout = num_users, num_news, id_dropout
        K = field_dim
        sizes = {
            "user": num_users + 1,
            "news": max(num_news, 1),
            "cat": num_categories,
            "sub": num_subcategories,
        }
        self.emb = nn.ModuleDict({k: nn.Embedding(max(n, 1), K) for k, n in sizes.items()})
        for e in self.emb.values():
            nn.init.normal_(e.weight, std=0.01)
        self.title_proj = nn.Linear(dim, K, bias=False)  # P
        self.lin = self.title_lin = None  # first-order weights (DeepFM; DCN has none)
        if first_order:
            self.lin = nn.ModuleDict({k: nn.Embedding(max(n, 1), 1) for k, n in sizes.items()})
            for e in self.lin.values():
                nn.init.zeros_(e.weight)
            self.title_lin = nn.Linear(dim, 1, bias=False)  # a token's, from its vector
        self.register_buffer("idf", torch.ones(vocab_size))  # [V], fitted on the training news

    @classmethod
    def from_config(cls, cfg, first_order: bool = True) -> IDFields:
        """From a model config with dim, field_dim, num_* , vocab_size and id_dropout (DeepFM's, DCN's)."""
        sizes = (cfg.num_users, cfg.num_news, cfg.num_categories, cfg.num_subcategories, cfg.vocab_size)
        return cls(cfg.dim, cfg.field_dim, *sizes, cfg.id_dropout, first_order=first_order)

    def fit_idf(self, titles: np.ndarray) -> None:
        """IDF from the title token ids [N, L] (0 = padding) of the N training news."""
        self.idf.copy_(torch.from_numpy(idf_weights(titles, len(self.idf))))

    def _ids(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Ids past the table read 0; in training, ids are replaced by 0 at rate id_dropout."""
        ids = torch.where(ids > n, torch.zeros_like(ids), ids)
        if self.training and self.id_dropout > 0:
            drop = torch.rand(ids.shape, device=ids.device) < self.id_dropout
            ids = ids.masked_fill(drop, 0)
        return ids

    def _field(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        return self.emb[name](ids), 0.0 if self.lin is None else self.lin[name](ids)[..., 0]

    def user_fields(self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None) -> FieldState:
        B = hist_mask.shape[0]
        if users is None:
            users = torch.zeros(B, dtype=torch.long, device=hist_mask.device)
        u, u1 = self._field("user", self._ids(users, self.num_users))  # [B, K], [B]
        assert hist.extra is not None
        w = hist_mask.float()
        w = w / w.sum(-1, keepdim=True).clamp(min=1.0)  # [B, M]: mean over the clicked news
        vecs, first = [u], u1 + torch.zeros(B, device=u.device)
        for name, key in (("news", "news_id"), ("cat", "category"), ("sub", "subcategory")):
            ids = hist.extra[key]
            if name == "news":
                ids = self._ids(ids, self.num_news - 1)
            e, e1 = self._field(name, ids)  # [B, M, K], [B, M]
            vecs.append(torch.einsum("bm,bmk->bk", w, e))
            first = first + (w * e1).sum(-1)
        return FieldState(torch.stack(vecs, 1), first)  # [B, 4, K]

    def tfidf(self, ids: torch.Tensor) -> torch.Tensor:
        """Title token ids [..., L] (0 = padding) -> each position's TF-IDF weight w_l [..., L]."""
        mask = ids > 0
        n = mask.sum(-1, keepdim=True).clamp(min=1)  # title length
        count = ((ids[..., :, None] == ids[..., None, :]) & mask[..., None, :]).sum(-1).clamp(min=1)
        idf = self.idf[ids.clamp(max=len(self.idf) - 1)] * mask
        value = count / n * idf  # the token's tf-idf, at each of its positions
        norm = ((value**2) / count).sum(-1, keepdim=True).sqrt().clamp(min=1e-6)  # over distinct tokens
        return idf / n / norm

    def fields(self, state: FieldState, cand: NewsRepr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> field vectors [B, C, F, K], first-order sum [B, C], and the title's sum over its
        tokens of (w_l P x_l)^2 [B, C, K] (FM's squared terms, token by token)."""
        assert cand.extra is not None and cand.tokens is not None
        x = cand.tokens  # [B, C, L', E] (L' <= L: frozen mode trims to the batch's longest title)
        ids = cand.extra["title_ids"][..., : x.shape[-2]]  # [B, C, L']
        w = self.tfidf(ids)[..., None]  # [B, C, L', 1]; zero at padding
        px = self.title_proj(x) * w  # [B, C, L', K]
        title, title_sq = px.sum(-2), (px**2).sum(-2)  # [B, C, K]
        title1 = 0.0 if self.title_lin is None else (self.title_lin(x) * w).sum((-2, -1))  # [B, C]
        news = self._ids(cand.extra["news_id"], self.num_news - 1)
        n, n1 = self._field("news", news)
        c, c1 = self._field("cat", cand.extra["category"])
        s, s1 = self._field("sub", cand.extra["subcategory"])
        B, C = news.shape
        user = state.vectors[:, None].expand(B, C, *state.vectors.shape[1:])  # [B, C, 4, K]
        f = torch.cat([user[:, :, :1], torch.stack([n, c, s], 2), user[:, :, 1:], title[:, :, None]], 2)
        return f, state.first[..., None] + n1 + c1 + s1 + title1, title_sq
