"""DKN (Wang et al., WWW 2018): knowledge-aware CNN news encoder, candidate-aware user attention.

Shape letters: B users, C candidates, M history, L title tokens, E token width, V entity vector
width, W filter windows, F = W * filters, H hidden width.

News (KCNN): every title token l has three aligned channels [E] each,
    w_l          its word vector (the news side's: the word embedding, initialised from BERT's
                 input embeddings, in encoder mode "words"; the original used word2vec)
    g(e_l)       tanh(M e_l + b): the vector of the title entity that names token l, transformed
                 into the word space (zero where no entity names the token)
    g'(e_l)      tanh(M' e_l + b'): the original's third channel transforms the entity's context
                 (the mean of its knowledge-graph neighbours); MIND gives entity vectors but no
                 neighbour lists, so here it is a second transformation of the entity vector
and the title [L, 3E] goes through convolutions of windows 1..W (`filters` each, ReLU) with
max-over-time pooling -> e(t) [F].
Entity vectors e are the training split's `entity_embedding.vec` (MIND's TransE vectors, fixed)
when it has one and `pretrained`; otherwise learned embeddings of width `entity_dim`. The run's
config records which (`entity_source`, `vector_dim`).
Word-entity alignment: MIND lists each title entity with its surface forms; a token is aligned
to an entity when it lies in one of its surface forms, found as that form's WordPiece sequence
in the title (models/tables.py, `align_entities`). The original aligned by character offsets
after its own tokenisation; the result is the same except for forms cut off by the title length.

User: for candidate t_c, clicked news t_m get attention weights softmax_m(DNN([e(t_m); e(t_c)]))
and the user is their weighted sum. Score: DNN([user; e(t_c)]) (the original's G).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmbert.models.base import Recommender, masked_softmax
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class DKNConfig:
    dim: int = 384  # E: the news side's token width (set from the encoder)
    filters: int = 100  # per window size
    windows: int = 4  # W: window sizes 1..W (the paper's 1, 2, 3, 4)
    entity_dim: int = 100  # learned entity embeddings (no entity_embedding.vec)
    pretrained: bool = True  # read the training split's entity_embedding.vec when it has one
    hidden: int = 100  # H: the attention DNN's and the click DNN's hidden width
    dropout: float = 0.2
    # resolved from the data
    num_entities: int = 0  # entity vocabulary + 1 (0 = none / unknown)
    vector_dim: int = 0  # V of entity_embedding.vec; 0 = learned entity embeddings
    entity_source: str = "learned"  # "entity_embedding.vec" (pretrained, fixed) or "learned"


class DKNState:
    def __init__(self, h: torch.Tensor, mask: torch.Tensor, key: torch.Tensor) -> None:
        self.h, self.mask, self.key = h, mask, key  # [B, M, F], [B, M], [B, M, H]


class DKN(Recommender):
    name = "dkn"
    encodes_news = True
    needs_history_tokens = True
    side_inputs = ("title_entity",)

    def __init__(self, cfg: DKNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, H, F = cfg.dim, cfg.hidden, cfg.filters * cfg.windows
        n = max(cfg.num_entities, 1)
        if cfg.vector_dim:
            self.register_buffer("ent_vec", torch.zeros(n, cfg.vector_dim))  # [entities, V], saved
            self.ent_emb = None
            width = cfg.vector_dim
        else:
            self.ent_emb = nn.Embedding(n, cfg.entity_dim, padding_idx=0)
            nn.init.normal_(self.ent_emb.weight, std=0.1)
            width = cfg.entity_dim
        self.g = nn.Linear(width, E)  # M, b
        self.g_context = nn.Linear(width, E)  # M', b'
        self.convs = nn.ModuleList(nn.Conv1d(3 * E, cfg.filters, w) for w in range(1, cfg.windows + 1))
        self.drop = nn.Dropout(cfg.dropout)
        self.att_hist = nn.Linear(F, H)  # the attention DNN's first layer, split over [e(t_m); e(t_c)]
        self.att_cand = nn.Linear(F, H, bias=False)
        self.att_out = nn.Linear(H, 1)
        self.click = nn.Sequential(nn.Linear(2 * F, H), nn.ReLU(), nn.Linear(H, 1))

    def fit_training_news(self, vocab, tables: dict[str, np.ndarray]) -> None:
        if self.ent_emb is None and vocab is not None and vocab.vectors is not None:
            self.ent_vec.copy_(torch.from_numpy(vocab.vectors))

    def entity_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Entity ids [...] -> vectors [..., V] (zero for 0)."""
        if self.ent_emb is not None:
            return self.ent_emb(ids)
        return self.ent_vec[ids]

    def encode_news(self, news: NewsRepr) -> torch.Tensor:
        """KCNN: [B, K, L, E] tokens + aligned entities -> [B, K, F]."""
        assert news.tokens is not None and news.mask is not None and news.extra is not None
        x, m = news.tokens, news.mask  # [B, K, L', E], [B, K, L']
        lead, L = x.shape[:2], x.shape[2]
        ent = news.extra["title_entity"][..., :L]  # [B, K, L']
        has = ((ent > 0) & m)[..., None]
        v = self.entity_vectors(ent)
        chans = [x, torch.tanh(self.g(v)) * has, torch.tanh(self.g_context(v)) * has]
        h = (self.drop(torch.cat(chans, -1)) * m[..., None]).reshape(-1, L, chans[0].shape[-1] * 3)
        h = h.transpose(1, 2)  # [N, 3E, L']
        mask = m.reshape(-1, 1, L)
        pooled = []
        for w, conv in enumerate(self.convs, start=1):
            c = torch.relu(conv(nn.functional.pad(h, (0, w - 1))))  # [N, filters, L']: window at l..l+w-1
            pooled.append((c * mask).amax(-1))  # max over windows starting at a title token (>= 0)
        return torch.cat(pooled, -1).view(*lead, -1)  # [B, K, F]

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> DKNState:
        h = self.encoded(hist)  # [B, M, F]
        return DKNState(h, hist_mask, self.att_hist(h))

    def score_candidates(self, state: DKNState, cand: NewsRepr) -> torch.Tensor:
        x = self.encoded(cand)  # [B, C, F]
        a = torch.relu(state.key[:, None] + self.att_cand(x)[:, :, None])  # [B, C, M, H]
        w = masked_softmax(self.att_out(a)[..., 0], state.mask[:, None].expand(-1, x.shape[1], -1))
        user = torch.einsum("bcm,bmf->bcf", w, state.h)  # [B, C, F]; zeros for an empty history
        return self.click(torch.cat([user, x], -1))[..., 0]
