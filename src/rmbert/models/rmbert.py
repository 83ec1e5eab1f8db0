"""RMBERT: a recurrent reasoning memory network over BERT news vectors (Jia et al., SIGIR 2021).

Shape letters: B users, C candidates, M history items, L title tokens, D hidden, Dm memory.
Inputs: x_n = candidate [CLS] [B, C, D]; X_con = candidate title tokens [B, C, L, D];
H = clicked news [CLS] vectors [B, M, D]. For step i = 1..p (parameters shared, except W_p^i):

    q_i  = W_p^i x_n + b_p^i                                        (1)
    kq_i = W_k [q_i ; k_{i-1}] + b_k                                (2)
    k_i  = W_q sum_j attn_j(w_a . (kq_i * X_j) + b_a) X_j + b_q     (3)
    I_i  = (W_r m_{i-1} + b_r) * (W_H H + b_H)                      (4)
    ~I_i = W_I [I_i ; H] + b_I                                      (5)
    U_i  = sum_j softmax_j(w_b . (~I_ij * k_i) + b_b) H_j           (6)
    m_i  = W_m [m_{i-1} ; U_i] + b_m                                (7)
    logit = W_2 ReLU(W_1 [x_n ; m_p] + b_1) + b_2                   (8)

with k_0 = x_n and m_0 a learned vector. Option `click_product` (not in the paper) adds a
similarity path to the click predictor, as DIN-style matchers do, so that how well the candidate
matches what the memory retrieved reaches the score without the MLP relearning a product:

    o = ReLU(W_1 [x_n ; m_p] + W_1p (x_n * (P m_p + b_P)) + b_1)   (8')

and option `memory_match` (not in the paper) hands the click predictor one number from the memory:
how well the candidate matches what the memory retrieved, the cosine of x_n and P m_p + b_P (P
shared with eq. 8'), a path of low capacity where [x_n ; m_p] and eq. 8' give it D inputs:

    o = ReLU(... + W_1r cos(x_n, P m_p + b_P) + b_1)                 (8m)

and option `match_strength` (not in the paper) hands the click predictor what eq. 6's softmax
discards: each step's log-sum-exp of the history attention logits, a smooth maximum that grows
with how well, and with how many, clicked news matched (s = [lse_1 .. lse_p], 0 for no history):

    o = ReLU(... + W_1s s + b_1)                                     (8'')

and option `similarity` (not in the paper) gives the click predictor a learned-metric matcher
beside the memory: with S a D x D map initialised to the identity, c_j = cos(S x_n, S h_j) over
clicked news, and its max and mean (0 for no history), the features a logistic regression on
cosines reads; at initialisation they are the no-training max- and mean-cosine scores:

    o = ReLU(... + W_1c [max_j c_j ; mean_j c_j] + b_1)             (8''')

With `similarity_heads` = h > 1, S maps to h metrics (each D x D, all from the identity) and
the click layer reads the max and mean cosine of each ([B, C, 2h]): heads can specialise, one on
the title, one on the category or entity embeddings that `features.*` add to the news vectors.

Option `feature_match` (not in the paper) hands the click layer exact overlaps that a cosine
blurs: for each kind k (same category, same subcategory, at least one shared entity) and clicked
news j, e_kj = 1 if the candidate and h_j match in k (`match_features`; ids from the `match`
side table, hashed so that news unseen in training match too), and the click layer reads the
share of clicked news that match and whether any does (0 for no history):

    o = ReLU(... + W_1f [mean_j e_kj ; max_j e_kj]_k + b_1)         (8'''')

and option `content_match` (not in the paper) grades what the candidate's content shares with
each clicked news, where exact ids see only equal or not:
- words: with T_n the distinct WordPiece ids of a title (side table `title_ids`) and idf(t)
  fitted on the training split's titles, l_j = sum_{t in T_n & T_j} idf(t)^2 / (|T_n|_idf
  |T_j|_idf), the cosine of binary IDF-weighted bags of words (a frozen sentence vector blurs
  which words two titles share; this counts them, rare words most);
- entities: r_j = max over the two news' entities (side table `entity_ids`) of the cosine of
  their pretrained vectors (MIND's `entity_embedding.vec`, as the feature vocabulary holds
  them), clipped at 0, 0 where either news has none: related entities, not only the same one.
The IDF and the unit entity vectors are buffers saved with the weights. The click layer reads
the max and mean of each over clicked news (0 for no history):

    o = ReLU(... + W_1n [max_j l_j ; mean_j l_j ; max_j r_j ; mean_j r_j] + b_1)   (8''''')

and option `field_affinity` (not in the paper) learns how the candidate's category and subcategory
relate to each clicked news's, beyond equality: with A_c [N_c, N_c] and A_s [N_s, N_s] learned
tables (from zero; an unknown value, id 0, stays out) and c(.), s(.) a news's category and
subcategory ids (side tables `category`, `subcategory`), a^c_j = A_c[c(n), c(j)] and a^s_j =
A_s[s(n), s(j)], and the click layer reads their max and mean over clicked news (0 for no
history) beside a candidate prior of the same low capacity, b_c[c(n)] and b_s[s(n)]: relations
such as "readers of one subcategory click another" and a category's base rate, which hold for
news never seen in training, where a prior over the candidate's D-dim vector does not:

    o = ReLU(... + W_1a [max_j a^c_j ; mean_j a^c_j ; max_j a^s_j ; mean_j a^s_j ;
                         b_c[c(n)] ; b_s[s(n)]] + b_1)                   (8f)

and option `click_concat=false` (not in the paper) takes eq. 8's concatenation out of the click layer,
so that the candidate reaches the score only through its match with what the memory retrieved (eq.
8') and the side features above, not through a prior over its own vector: on planted data that
prior is fitted fast and does not carry over to unseen news (docs/results/quality.md). W_1 is held
at zero (not trained), so the folded form is the same code:

    o = ReLU(b_1 + W_1p (x_n * (P m_p + b_P)) + ...)                  (8c)

and option `wide` (not in the paper) also hands these side features f (those of eq. 8''',
8'''' and 8''''' that are on) straight to the logit, as Wide & Deep does, so that a linear use
of them needs no hidden unit (w_w starts at zero: the model without it):

    logit = W_2 o + b_2 + w_w . f                                    (8w)
 `memory_logits_direct` computes (4)-(6) literally
([B, C, M, D] tensors); `memory_logits_fast` is the exact fast path: with v = w_b * k_i,
W_I = [W_I1 W_I2], r = W_r m_{i-1} + b_r and G = W_H H + b_H (per user, computed once),

    w_b . (~I_ij * k_i) = ((W_I1^T v) * r) . G_j + (W_I2^T v) . H_j + v . b_I

which costs O(D^2 + M D) per candidate and step instead of O(M D^2).

Masking: padded title tokens and history slots never get attention. An empty history gives
U_i = 0 at every step, so the memory evolves from m_0 alone and the score is a
candidate-only prior (x_n through the click predictor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmbert.models.base import NEG, Recommender, masked_logsumexp, masked_mean_weights, masked_softmax
from rmbert.models.tables import idf_weights
from rmbert.types import NewsRepr, Scores

MATCH_KINDS = 3  # eq. 8'''': category, subcategory, a shared entity
SWITCH_OF = {
    "match": "rmbert.feature_match",
    "title_ids": "rmbert.content_match",
    "entity_ids": "rmbert.content_match",
    "category": "rmbert.field_affinity",
    "subcategory": "rmbert.field_affinity",
}
AFFINITY_FEATURES = 6  # eq. 8f


def side_input(news: NewsRepr, name: str) -> torch.Tensor:
    if news.extra is None or name not in news.extra:
        raise ValueError(f"{SWITCH_OF[name]} reads the side input {name!r}, which these news lack")
    return news.extra[name]


def slots_in_use(ids: torch.Tensor | np.ndarray) -> int:
    """Id slots ids [..., E] (0 = none; a tensor or an array) -> 1 + the last slot any row uses
    (0 for none): the entity slots worth comparing. Read from the last, most often in use: one
    column (13k news of a 1M pool: 0.14 -> 0.02 ms)."""
    E = ids.shape[-1]
    while E and not bool(ids[..., E - 1].any()):
        E -= 1
    return E


def bag_norm(t: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Title token ids t [..., L] (0 = padding) -> the norm of the title's binary IDF-weighted bag
    of words [...]: sqrt of the sum of idf(t)^2 over its distinct tokens (each sorted id's first
    occurrence)."""
    s = t.clamp(0, len(idf) - 1).sort(-1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    return (idf[s] * (first & (s > 0))).square().sum(-1).sqrt()


@dataclass(frozen=True)
class RMBERTConfig:
    dim: int = 384  # D: the news encoder's hidden size (set from the encoder)
    memory_dim: int = 0  # Dm (0 = D)
    steps: int = 4  # p, the number of reasoning memory cells
    click_hidden: int = 0  # width of o in (8) (0 = D)
    query_attention: str = "softmax"  # softmax | sigmoid (the paper's text drops the sum-to-one)
    prev_query: bool = True  # False: w/o PQ, eq. 2 without k_{i-1}
    prev_memory: bool = True  # False: w/o PM, eq. 4 without m_{i-1}
    attention: bool = True  # False: w/o Att, both attentions -> masked mean pooling
    fast_path: bool = True  # exact fast path for eq. 4-6 (False: the direct form)
    dropout: float = 0.0  # on x_n, X_con and H
    click_product: bool = False  # eq. 8': the product x_n * P m_p inside the click predictor
    click_concat: bool = True  # False: eq. 8c, eq. 8 without W_1 [x_n ; m_p] (W_1 held at zero)
    memory_match: bool = False  # eq. 8m: cos(x_n, P m_p + b_P), the memory's match, to the click layer
    match_strength: bool = False  # eq. 8'': each step's log-sum-exp of the history logits, to the click layer
    similarity: bool = (
        False  # eq. 8''': max and mean learned-metric cosine to clicked news, to the click layer
    )
    similarity_heads: int = 1  # h learned metrics in eq. 8''' (each its own max and mean)
    feature_match: bool = False  # eq. 8'''': category, subcategory and entity overlap with clicked news
    content_match: bool = False  # eq. 8''''': title-word overlap and entity relatedness with clicked news
    field_affinity: bool = False  # eq. 8f: learned category/subcategory relations to clicked news, a prior
    wide: bool = False  # eq. 8w: the side features of eq. 8'''-8f linearly to the logit too
    # resolved from the encoder and the feature vocabulary (content_match's buffers)
    vocab_size: int = 0  # V: the WordPiece vocabulary (the IDF table)
    num_entities: int = 0  # the feature vocabulary's entities + 1
    vector_dim: int = 0  # the entity vectors' width (0: no entity_embedding.vec, r_j = 0)
    num_categories: int = 0  # the feature vocabulary's categories + 1 (field_affinity's N_c)
    num_subcategories: int = 0  # its subcategories + 1 (N_s)

    def __post_init__(self) -> None:
        if self.query_attention not in ("softmax", "sigmoid"):
            raise ValueError(f"query_attention must be softmax or sigmoid, not {self.query_attention!r}")
        if self.similarity_heads < 1:
            raise ValueError(f"rmbert.similarity_heads must be >= 1, not {self.similarity_heads}")
        if self.steps < 1:
            raise ValueError("steps (p) must be at least 1")
        if self.dim < 1 or self.memory_dim < 0 or self.click_hidden < 0:
            raise ValueError("rmbert.dim must be >= 1, rmbert.memory_dim and rmbert.click_hidden >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"rmbert.dropout must be in [0, 1), not {self.dropout}")


@dataclass
class UserState:
    H: torch.Tensor  # [B, M, D] clicked news vectors
    mask: torch.Tensor  # [B, M] bool
    GH: torch.Tensor  # [B, M, 2D] = [W_H H + b_H ; H]
    Hs: torch.Tensor | None = None  # [B, M, h, D] unit S h_j per metric head (similarity)
    match: torch.Tensor | None = None  # [B, M, F] clicked news' match ids (feature_match)
    words: torch.Tensor | None = None  # [B, M, L] clicked news' title token ids (content_match)
    ents: torch.Tensor | None = None  # [B, M, E] clicked news' entity ids (content_match)
    fields: torch.Tensor | None = None  # [B, M, 2] clicked news' category, subcategory ids (field_affinity)


class RMBERT(Recommender):
    name = "rmbert"
    dedup_candidates = True  # reason() takes unique candidates with an index (see there)

    def __init__(self, cfg: RMBERTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        Dm = cfg.memory_dim or D
        self.W_p = nn.ModuleList([nn.Linear(D, D) for _ in range(cfg.steps)])  # (1), one per step
        self.W_k = nn.Linear(2 * D, D)  # (2)
        self.W_alpha = nn.Linear(D, 1)  # (3) attention over title tokens
        self.W_q = nn.Linear(D, D)  # (3)
        self.W_r = nn.Linear(Dm, D)  # (4)
        self.W_H = nn.Linear(D, D)  # (4)
        self.W_I = nn.Linear(2 * D, D)  # (5)
        self.W_beta = nn.Linear(D, 1)  # (6) attention over history
        self.W_m = nn.Linear(Dm + D, Dm)  # (7)
        self.m0 = nn.Parameter(torch.randn(Dm) * 0.02)  # m_0, randomly initialised
        H1 = cfg.click_hidden or D
        self.W_1 = nn.Linear(D + Dm, H1)  # (8)
        self.W_2 = nn.Linear(H1, 1)  # (8)
        if not cfg.click_concat:  # (8c): W_1 [x_n ; m_p] is zero, only b_1 is learned
            others = (cfg.click_product, cfg.memory_match, cfg.similarity, cfg.feature_match)
            if not any(others) and not (cfg.content_match or cfg.field_affinity):
                raise ValueError(
                    "rmbert.click_concat=false needs another input: click_product or a side feature"
                )
            nn.init.zeros_(self.W_1.weight)
            self.W_1.weight.requires_grad_(False)
        if cfg.click_product or cfg.memory_match:
            self.P = nn.Linear(Dm, D)  # (8'), (8m)
        if cfg.click_product:
            self.W_1p = nn.Linear(D, H1, bias=False)  # (8')
        if cfg.memory_match:
            self.W_1r = nn.Linear(1, H1, bias=False)  # (8m)
        if cfg.match_strength:
            self.W_1s = nn.Linear(cfg.steps, H1, bias=False)  # (8'')
        if cfg.similarity:
            h = cfg.similarity_heads
            self.S = nn.Linear(D, h * D, bias=False)  # (8''') h metrics, each from the identity
            self.S.weight.data.copy_(torch.eye(D).repeat(h, 1))
            self.W_1c = nn.Linear(2 * h, H1, bias=False)  # (8''')
        self.side_inputs = self.inputs_for(cfg)
        self._init_side_paths(cfg, H1)
        self.drop = nn.Dropout(cfg.dropout)

    def _init_side_paths(self, cfg: RMBERTConfig, H1: int) -> None:
        """The click layer's inputs from side tables (eq. 8'''', 8''''', 8f) and eq. 8w."""
        if cfg.feature_match:
            self.W_1f = nn.Linear(2 * MATCH_KINDS, H1, bias=False)  # (8'''')
        if cfg.content_match:
            if cfg.vocab_size < 1:
                raise ValueError("rmbert.content_match needs rmbert.vocab_size (resolved from the encoder)")
            self.register_buffer("idf", torch.ones(cfg.vocab_size))  # [V], fitted on the training news
            n_ent, width = max(cfg.num_entities, 1), max(cfg.vector_dim, 1)
            self.register_buffer("ent_unit", torch.zeros(n_ent, width))  # unit entity vectors, row 0 zero
            self.W_1n = nn.Linear(4, H1, bias=False)  # (8''''')
        if cfg.field_affinity:
            nc, ns = cfg.num_categories, cfg.num_subcategories
            if nc < 1 or ns < 1:
                raise ValueError(
                    "rmbert.field_affinity needs rmbert.num_categories and num_subcategories "
                    "(resolved from the feature vocabulary)"
                )
            self.A_c = nn.Parameter(torch.zeros(nc, nc))  # (8f)
            self.A_s = nn.Parameter(torch.zeros(ns, ns))
            self.b_c = nn.Parameter(torch.zeros(nc))
            self.b_s = nn.Parameter(torch.zeros(ns))
            self.W_1a = nn.Linear(AFFINITY_FEATURES, H1, bias=False)  # (8f)
        if cfg.wide:
            n = (
                2 * cfg.similarity_heads * cfg.similarity
                + 2 * MATCH_KINDS * cfg.feature_match
                + 4 * cfg.content_match
                + AFFINITY_FEATURES * cfg.field_affinity
            )
            if n == 0:
                raise ValueError(
                    "rmbert.wide needs similarity, feature_match, content_match or field_affinity"
                )
            self.w_w = nn.Linear(n, 1, bias=False)  # (8w)
            nn.init.zeros_(self.w_w.weight)

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> UserState:
        H = self.drop(hist.cls)  # [B, M, D]
        G = self.W_H(H)  # [B, M, D]
        Hs = self.metric(H) if self.cfg.similarity else None
        match = side_input(hist, "match") if self.cfg.feature_match else None
        words = side_input(hist, "title_ids") if self.cfg.content_match else None
        ents = side_input(hist, "entity_ids") if self.cfg.content_match else None
        fields = self.field_ids(hist) if self.cfg.field_affinity else None
        GH = torch.cat([G, H], dim=-1)
        return UserState(
            H=H, mask=hist_mask, GH=GH, Hs=Hs, match=match, words=words, ents=ents, fields=fields
        )

    @classmethod
    def inputs_for(cls, cfg: RMBERTConfig) -> tuple[str, ...]:
        return (
            ("match",) * cfg.feature_match
            + ("title_ids", "entity_ids") * cfg.content_match
            + ("category", "subcategory") * cfg.field_affinity
        )

    @staticmethod
    def field_ids(news: NewsRepr) -> torch.Tensor:
        """News [..] -> their category and subcategory ids [.., 2] (field_affinity)."""
        return torch.stack([side_input(news, "category"), side_input(news, "subcategory")], -1)

    def affinity_features(self, cf: torch.Tensor, hf: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Candidates' category and subcategory ids cf [B, C, 2], clicked news' hf [B, M, 2], mask
        [B, M] -> the six features of eq. 8f [B, C, 6]: per field the max and mean over unmasked
        clicked news of the learned affinity (0 for none, and for an unknown id on either side),
        then the candidate's priors."""
        out = []
        m = mask[:, None, :]  # [B, 1, M]
        for f, A in enumerate((self.A_c, self.A_s)):
            c, h = cf[..., f], hf[..., f]  # [B, C], [B, M]
            ok = (c != 0)[..., None] & (h != 0)[:, None, :] & m  # [B, C, M]
            # A[c[..., None], h[:, None, :]] as two gathers: rows, then columns (2.5x faster)
            a = A.index_select(0, c.flatten()).view(*c.shape, -1).gather(-1, h[:, None, :].expand_as(ok))
            a = a * ok  # [B, C, M]
            top = a.masked_fill(~m, NEG).amax(-1) if a.shape[-1] else a.sum(-1)  # [B, C]
            top = top.where(mask.any(-1)[:, None], torch.zeros_like(top))
            out += [top, a.sum(-1) / mask.sum(-1).clamp(min=1)[:, None]]
        out += [self.b_c[cf[..., 0]] * (cf[..., 0] != 0), self.b_s[cf[..., 1]] * (cf[..., 1] != 0)]
        return torch.stack(out, -1)

    @torch.no_grad()
    def affinity_proxy(self, cf: torch.Tensor, hf: torch.Tensor) -> torch.Tensor:
        """`affinity_features` for one user, every click unmasked: cf [G, 2], hf [M, 2] -> [G, 6].
        A candidate's features depend on its ids alone, so each field's max and mean are taken
        once per distinct id among the candidates ([U, M] instead of [G, M]: retrieval's first
        cut holds 2,000 news of a few dozen subcategories)."""
        out = []
        for f, A in enumerate((self.A_c, self.A_s)):
            ids, at = torch.unique(cf[:, f], return_inverse=True)  # [U], [G]
            h = hf[:, f]  # [M]
            a = A.index_select(0, ids).index_select(1, h) * ((ids != 0)[:, None] & (h != 0)[None])  # [U, M]
            top = a.amax(-1) if len(h) else a.sum(-1)  # [U]
            out += [top[at], (a.sum(-1) / max(len(h), 1))[at]]
        out += [self.b_c[cf[:, 0]] * (cf[:, 0] != 0), self.b_s[cf[:, 1]] * (cf[:, 1] != 0)]
        return torch.stack(out, -1)

    def fit_training_news(self, vocab, tables: dict) -> None:
        """content_match: the IDF of the training titles and the vocabulary's unit entity vectors."""
        if not self.cfg.content_match:
            return
        self.idf.copy_(torch.from_numpy(idf_weights(tables["title_ids"], len(self.idf))))
        if vocab is not None and vocab.vectors is not None and self.cfg.vector_dim:
            v = torch.from_numpy(vocab.vectors).to(self.ent_unit.dtype)
            self.ent_unit.copy_(nn.functional.normalize(v, dim=-1))  # zero rows stay zero

    def metric(self, x: torch.Tensor) -> torch.Tensor:
        """News vectors [..., D] -> unit S x per metric head [..., h, D] (eq. 8''')."""
        return nn.functional.normalize(self.S(x).unflatten(-1, (self.cfg.similarity_heads, -1)), dim=-1)

    @staticmethod
    def similarity_features(xs: torch.Tensor, Hs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors xs [B, C, h, D] and Hs [B, M, h, D], mask [B, M] -> per head
        [max_j c_j, mean_j c_j], [B, C, 2h] (head-major), of the cosines c_j over unmasked clicked
        news (0 for none), eq. 8'''."""
        c = torch.einsum("bchd,bmhd->bchm", xs, Hs)  # [B, C, h, M]
        m = mask[:, None, None, :]
        n = mask.sum(-1).clamp(min=1)[:, None, None]  # [B, 1, 1]
        # -2 lies below every cosine and fits in fp16 (NEG does not)
        any_ = mask.any(-1)[:, None, None]
        top = c.masked_fill(~m, -2.0).amax(-1).where(any_, torch.zeros_like(c[..., 0]))  # [B, C, h]
        return torch.stack([top, (c * m).sum(-1) / n], -1).flatten(-2)

    @staticmethod
    def match_features(cm: torch.Tensor, hm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Match ids of candidates cm [B, C, F] and of clicked news hm [B, M, F] (0 = none), mask
        [B, M] -> [B, C, 2K] (K = 3 kinds: category, subcategory, a shared entity): the share of
        unmasked clicked news that match the candidate in each kind, then whether any does
        (all 0 for no history), eq. 8''''."""
        c, h = cm[:, :, None], hm[:, None]  # [B, C, 1, F], [B, 1, M, F]
        cat = (c[..., 0] == h[..., 0]) & (c[..., 0] != 0)  # [B, C, M]
        sub = (c[..., 1] == h[..., 1]) & (c[..., 1] != 0)
        E_c, E_h = slots_in_use(cm[..., 2:]), slots_in_use(hm[..., 2:])  # (200 candidates: 1.0 -> 0.3 ms)
        ce = c[..., 2 : 2 + E_c]  # [B, C, 1, E_c]
        ce = ce.masked_fill(ce == 0, -1)  # -1 matches nothing
        ent = torch.zeros_like(cat)  # [B, C, M]: one candidate slot at a time (no [.., E, E] tensor)
        for e in range(E_c):
            ent |= (ce[..., e, None] == h[..., 2 : 2 + E_h]).any(-1)
        hits = torch.stack([cat, sub, ent], -1) & mask[:, None, :, None]  # [B, C, M, K]
        n = mask.sum(-1).clamp(min=1)[:, None, None]  # [B, 1, 1]
        share = hits.sum(2) / n
        return torch.cat([share, hits.any(2).to(share.dtype)], -1)

    @staticmethod
    @torch.no_grad()
    def lexical_cosines(ct: torch.Tensor, ht: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
        """Title token ids ct [B, C, L] and ht [B, M, L'] (0 = padding), idf [V] -> l [B, C, M],
        the IDF-weighted cosine of the binary bags of the two titles' words (eq. 8'''''). Costs
        O(B C M U), U the most distinct words of one row of ct: put the smaller side first."""
        B, V = ct.shape[0], len(idf)
        ct, ht = ct.clamp(0, V - 1), ht.clamp(0, V - 1)
        # Row b's bag of words spans only the words of ct[b] (U_b of them): keys b V + t, sorted;
        # row b's words are keys[start_b : start_b + U_b].
        user = torch.arange(B, device=ct.device)[:, None, None] * V
        keys, index = torch.unique(ct + user, return_inverse=True)  # [K], [B, C, L]
        start = torch.searchsorted(keys, user.flatten())  # [B]
        U = int((torch.searchsorted(keys, user.flatten() + V) - start).max())
        at = torch.searchsorted(keys, ht + user).clamp(max=len(keys) - 1)  # [B, M, L']
        found = (keys[at] == ht + user) & (ht > 0)  # a word of ht[b] among ct[b]'s
        local_c = index - start[:, None, None]  # [B, C, L] in [0, U)
        local_h = torch.where(found, at - start[:, None, None], U)  # U: a column for the rest
        # binary bags (amax: a repeated word counts once), idf-weighted, padding 0
        bc = idf.new_zeros(*ct.shape[:2], U + 1).scatter_reduce_(-1, local_c, idf[ct] * (ct > 0), "amax")
        bh = idf.new_zeros(*ht.shape[:2], U + 1).scatter_reduce_(-1, local_h, idf[ht] * found, "amax")
        dot = torch.einsum("bcu,bmu->bcm", bc[..., :U], bh[..., :U])  # sum of idf^2 over shared words
        norm = bag_norm(ct, idf)[:, :, None] * bag_norm(ht, idf)[:, None, :]  # [B, C, M]
        return dot / norm.clamp(min=1e-6)

    @staticmethod
    @torch.no_grad()
    def entity_cosines(ce: torch.Tensor, he: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Entity ids ce [B, C, E] and he [B, M, E] (0 = none), unit entity vectors [N, V] (row 0
        zero) -> r [B, C, M], the largest cosine between an entity of each news clipped at 0
        (0 where either has none), eq. 8'''''."""
        E = max(slots_in_use(ce), slots_in_use(he), 1)  # the slots in use
        uc, uh = unit[ce[..., :E]], unit[he[..., :E]]  # [B, C, E, V], [B, M, E, V]
        cos = torch.einsum("bcev,bmfv->bcmef", uc, uh)  # [B, C, M, E, E]
        return cos.flatten(-2).amax(-1).clamp(min=0)

    @staticmethod
    @torch.no_grad()
    def lexical_pair_cosines(
        ct: torch.Tensor, ht: torch.Tensor, idf: torch.Tensor, norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`lexical_cosines` for one user, ct [G, L], ht [M, L'] -> l [G, M]: both sides' binary
        bags over the U distinct words of the clicks, one [G, U] x [U, M] product (words the
        clicks lack add nothing to the dot, only to the candidate's norm). norm [G]: the
        candidates' `bag_norm`, where the caller has it (serving keeps it per news:
        `FoldedRMBERT.table_terms`). A repeated word is written twice to the same column, so
        with the norms given no candidate's words are sorted (2,000 candidates: 2.0 -> 1.1 ms).
        The idf^2 weigh the clicks' [M, U] side, not the candidates' [G, U] (1.6 -> 1.4 ms)."""
        V = len(idf)
        ct, ht = ct.clamp(0, V - 1), ht.clamp(0, V - 1)
        words = torch.unique(ht[ht > 0])  # [U]
        U = len(words)
        column = torch.full((V,), U, dtype=torch.long, device=ct.device)
        column[words] = torch.arange(U, device=ct.device)  # a word's column, U for the rest
        weight = torch.cat([idf[words].square(), idf.new_zeros(1)])  # [U + 1]: column U (the rest) 0
        bc = idf.new_zeros(len(ct), U + 1).scatter_(1, column[ct], 1.0)  # [G, U + 1] 0/1
        bh = idf.new_zeros(len(ht), U + 1).scatter_(1, column[ht], 1.0) * weight  # [M, U + 1]
        dot = bc @ bh.T  # [G, M]: sum of idf^2 over shared words
        norm = (bag_norm(ct, idf) if norm is None else norm)[:, None] * bag_norm(ht, idf)[None]
        return dot / norm.clamp(min=1e-6)

    @staticmethod
    @torch.no_grad()
    def entity_pair_cosines(ce: torch.Tensor, he: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """`entity_cosines` for one user, ce [G, E], he [M, E] -> r [G, M], over distinct
        entities: one [U_c, U_h] product of the entities each side names instead of G M E E dot
        products (retrieval gathers thousands of news that share few entities)."""
        E = max(slots_in_use(ce), slots_in_use(he), 1)  # the slots in use
        uc, ic = torch.unique(ce[:, :E], return_inverse=True)  # [U_c], [G, E]
        uh, ih = torch.unique(he[:, :E], return_inverse=True)  # [U_h], [M, E]
        cos = unit[uc] @ unit[uh].T  # [U_c, U_h]; entity 0 is the zero row
        per_click = cos[:, ih].amax(-1)  # [U_c, M]: each distinct entity against each click
        return per_click[ic].amax(1).clamp(min=0)  # [G, E, M] -> [G, M]

    @staticmethod
    def max_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Non-negative x [B, C, M], mask [B, M] -> [max_j, mean_j] over unmasked j [B, C, 2]
        (0 for none)."""
        x = x * mask[:, None, :]
        if x.shape[-1] == 0:
            return x.new_zeros(*x.shape[:2], 2)
        return torch.stack([x.amax(-1), x.sum(-1) / mask.sum(-1).clamp(min=1)[:, None]], -1)

    @staticmethod
    def lexical_features(
        ct: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor, idf: torch.Tensor
    ) -> torch.Tensor:
        """Candidates' title ids ct [B, C, L], clicked news' ht [B, M, L'], mask [B, M] ->
        [max_j l_j, mean_j l_j] [B, C, 2] (`lexical_cosines`), eq. 8'''''."""
        return RMBERT.max_mean(RMBERT.lexical_cosines(ct, ht, idf), mask)

    @staticmethod
    def entity_features(
        ce: torch.Tensor, he: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor
    ) -> torch.Tensor:
        """Candidates' entity ids ce [B, C, E], clicked news' he [B, M, E], mask [B, M] ->
        [max_j r_j, mean_j r_j] [B, C, 2] (`entity_cosines`), eq. 8'''''."""
        return RMBERT.max_mean(RMBERT.entity_cosines(ce, he, unit), mask)

    def content_features(self, ct: torch.Tensor, ce: torch.Tensor, user) -> torch.Tensor:
        """Candidates' title ids [B, C, L] and entity ids [B, C, E], a user state with `words`,
        `ents` and `mask` -> the four features of eq. 8''''' [B, C, 4]."""
        lex = self.lexical_features(ct, user.words, user.mask, self.idf)
        ent = self.entity_features(ce, user.ents, user.mask, self.ent_unit)
        return torch.cat([lex, ent.to(lex.dtype)], -1)

    @torch.no_grad()
    def content_proxy(
        self,
        ct: torch.Tensor,
        ce: torch.Tensor,
        ht: torch.Tensor,
        he: torch.Tensor,
        norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The four features of eq. 8''''' [G, 4] for G candidates (title ids ct [G, L], entity ids
        ce [G, E]; their titles' `bag_norm` [G] where known) of one user with clicks ht [M, L'],
        he [M, E], all unmasked: what `content_features` gives, with the bag of words over the
        clicks' words (G is large in retrieval, M small)."""
        if len(ht) == 0:
            return self.idf.new_zeros(len(ct), 4)
        lex = self.lexical_pair_cosines(ct, ht, self.idf, norm)  # [G, M]
        ent = self.entity_pair_cosines(ce, he, self.ent_unit)  # [G, M]
        return torch.stack(
            [lex.amax(-1), lex.mean(-1), ent.amax(-1).to(lex.dtype), ent.mean(-1).to(lex.dtype)], -1
        )

    # -- eq. 1-3: the query unit (the candidate alone) ------------------------------------------
    def query_step(
        self, i: int, x: torch.Tensor, k: torch.Tensor, X: torch.Tensor, xmask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, k: [..., D]; X: [..., L, D]; xmask [..., L] -> k_i [..., D], weights [..., L]."""
        q = self.W_p[i](x)  # (1) [..., D]
        k_prev = k if self.cfg.prev_query else torch.zeros_like(k)
        kq = self.W_k(torch.cat([q, k_prev], dim=-1))  # (2) [..., D]
        if not self.cfg.attention:
            a = masked_mean_weights(xmask, X.dtype)
        else:
            # w_a . (kq * X_j) = (w_a * kq) . X_j: one batched mat-vec, no [..., L, D] product
            logits = torch.einsum("...ld,...d->...l", X, kq * self.W_alpha.weight[0]) + self.W_alpha.bias
            if self.cfg.query_attention == "softmax":
                a = masked_softmax(logits, xmask)
            else:
                a = torch.sigmoid(logits) * xmask
        k_new = self.W_q(torch.einsum("...l,...ld->...d", a, X))  # (3) [..., D]
        return k_new, a

    def query_unit(self, x: torch.Tensor, X: torch.Tensor, xmask: torch.Tensor):
        """All p steps of eq. 1-3 (k_0 = x_n): lists of k_i [..., D] and title weights [..., L]."""
        k, ks, title = x, [], []
        for i in range(self.cfg.steps):
            k, a = self.query_step(i, x, k, X, xmask)
            ks.append(k)
            title.append(a)
        return ks, title

    # -- eq. 4-6: the memory unit, attention logits over history ---------------------------------
    def memory_logits_direct(self, k: torch.Tensor, m: torch.Tensor, state: UserState) -> torch.Tensor:
        """The literal form: materialises I_i and ~I_i, [B, C, M, D]. Returns logits [B, C, M]."""
        H, G = state.H, state.GH[..., : self.cfg.dim]  # [B, M, D]
        C = k.shape[1]
        if self.cfg.prev_memory:
            r = self.W_r(m)  # [B, C, D]
            I = r[:, :, None, :] * G[:, None, :, :]  # (4) [B, C, M, D]
        else:
            I = G[:, None, :, :].expand(-1, C, -1, -1)
        I_t = self.W_I(torch.cat([I, H[:, None].expand(-1, C, -1, -1)], dim=-1))  # (5) [B, C, M, D]
        return self.W_beta(I_t * k[:, :, None, :]).squeeze(-1)  # [B, C, M]

    def fast_terms(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidate's part of the fast path, from k_i [..., D]: with v = w_b * k_i,
        (W_I1^T v [..., D], W_I2^T v [..., D], v . b_I [...])."""
        D = self.cfg.dim
        v = k * self.W_beta.weight[0]
        return v @ self.W_I.weight[:, :D], v @ self.W_I.weight[:, D:], v @ self.W_I.bias

    def memory_logits_fast(self, terms: tuple, m: torch.Tensor, state: UserState) -> torch.Tensor:
        """The exact fast path: O(D^2 + M D) per candidate and step, given `fast_terms` of k_i
        ([B, C, ...] each). Returns logits [B, C, M]."""
        left, right, const = terms
        if self.cfg.prev_memory:
            left = left * self.W_r(m)
        lhs = torch.cat([left, right], dim=-1)  # [B, C, 2D]
        s = torch.einsum("bce,bme->bcm", lhs, state.GH)  # [B, C, M]
        return s + const[..., None] + self.W_beta.bias

    def memory_update(self, b: torch.Tensor, m: torch.Tensor, state: UserState) -> torch.Tensor:
        """History weights b [B, C, M] -> m_i [B, C, Dm]."""
        U = torch.einsum("bcm,bmd->bcd", b, state.H)  # (6) [B, C, D]
        return self.W_m(torch.cat([m, U], dim=-1))  # (7)

    def reason(self, state: UserState, cand: NewsRepr, record: bool = False) -> Scores:
        """Run the p cells: logits [B, C] and, if record, per-step weights over title words
        (`title` [B, C, p, L]) and clicked news (`history` [B, C, p, M]).

        The query unit and the candidate's part of the fast path depend on the candidate alone:
        given candidates deduplicated (cand [U, ...] with `cand.index` [B, C] into U), they run
        once per unique news and are gathered per (user, candidate); otherwise cand is [B, C, ...]."""
        idx = cand.index
        x = self.drop(cand.cls)  # [U, D] or [B, C, D]
        ks, title = self.query_unit(x, self.drop(cand.tokens), cand.mask)

        def per_pair(t: torch.Tensor) -> torch.Tensor:
            return t if idx is None else t[idx]

        xs = self.metric(x) if self.cfg.similarity else None  # [U|B C, h, D]
        x = per_pair(x)  # [B, C, D]
        B, C, _ = x.shape
        m = self.m0.expand(B, C, -1)  # m_0
        hmask = state.mask[:, None, :].expand(-1, C, -1)  # [B, C, M]
        hist_w, strength = [], []
        for i in range(self.cfg.steps):
            if not self.cfg.attention:
                b = masked_mean_weights(hmask, state.H.dtype)
                lse = torch.zeros(B, C, dtype=x.dtype, device=x.device)
            else:
                if self.cfg.fast_path:
                    terms = tuple(per_pair(t) for t in self.fast_terms(ks[i]))
                    logits = self.memory_logits_fast(terms, m, state)
                else:
                    logits = self.memory_logits_direct(per_pair(ks[i]), m, state)
                b = masked_softmax(logits, hmask)
                lse = masked_logsumexp(logits, hmask) if self.cfg.match_strength else None
            m = self.memory_update(b, m, state)
            hist_w.append(b)
            strength.append(lse)
        logits = self.click(x, m, strength, per_pair, xs, cand, state)
        if record:
            att = {"title": per_pair(torch.stack(title, -2)), "history": torch.stack(hist_w, 2)}
            return Scores(logits, att)
        return Scores(logits)

    def click(self, x, m, strength, per_pair, xs, cand: NewsRepr, state: UserState) -> torch.Tensor:
        """The click predictor, eq. 8 and its options: x_n [B, C, D], m_p [B, C, Dm], each step's
        log-sum-exp (match_strength), the candidates' metric vectors xs and side inputs (per
        unique news; `per_pair` spreads them to [B, C, ...]) -> logits [B, C]."""
        B, C, _ = x.shape
        xm = torch.cat([x, m], dim=-1) if self.cfg.click_concat else None
        pre = self.W_1(xm) if xm is not None else self.W_1.bias.expand(B, C, -1)  # (8) or (8c) [B, C, H1]
        y = self.P(m) if self.cfg.click_product or self.cfg.memory_match else None  # [B, C, D]
        if self.cfg.click_product:
            pre = pre + self.W_1p(x * y)  # (8')
        if self.cfg.memory_match:
            pre = pre + self.W_1r(nn.functional.cosine_similarity(x, y, dim=-1)[..., None])  # (8m)
        if self.cfg.match_strength:
            pre = pre + self.W_1s(torch.stack(strength, -1))  # (8'') [B, C, p] -> [B, C, H1]
        side = []  # the side features, for eq. 8w
        if self.cfg.similarity:
            side.append(self.similarity_features(per_pair(xs), state.Hs, state.mask))
            pre = pre + self.W_1c(side[-1])  # (8''')
        if self.cfg.feature_match:
            cm = per_pair(side_input(cand, "match"))  # [B, C, F]
            side.append(self.match_features(cm, state.match, state.mask).to(pre.dtype))
            pre = pre + self.W_1f(side[-1])  # (8'''')
        if self.cfg.content_match:
            ct, ce = per_pair(side_input(cand, "title_ids")), per_pair(side_input(cand, "entity_ids"))
            side.append(self.content_features(ct, ce, state).to(pre.dtype))
            pre = pre + self.W_1n(side[-1])  # (8''''')
        if self.cfg.field_affinity:
            side.append(self.affinity_features(per_pair(self.field_ids(cand)), state.fields, state.mask))
            pre = pre + self.W_1a(side[-1].to(pre.dtype))  # (8f)
        logits = self.W_2(torch.relu(pre)).squeeze(-1)  # [B, C]
        if self.cfg.wide:
            logits = logits + self.w_w(torch.cat(side, -1)).squeeze(-1)  # (8w)
        return logits

    def score_candidates(self, state: UserState, cand: NewsRepr) -> torch.Tensor:
        return self.reason(state, cand).logits

    @torch.no_grad()
    def fold(self):
        """An inference-only copy with the weights folded for serving (see `rmbert_folded`)."""
        from rmbert.models.rmbert_folded import FoldedRMBERT

        return FoldedRMBERT(self)

    def inference_form(self, embed_words=None):
        return self.fold()

    def scoring_form(self):
        """The folded form (the same function), unless `fast_path` is off: then evaluation
        runs eq. 4-6 literally, as training does."""
        return self.fold() if self.cfg.fast_path else None


__all__ = ["RMBERT", "RMBERTConfig", "UserState", "NEG"]
