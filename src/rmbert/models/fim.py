"""FIM, Fine-grained Interest Matching (Wang et al., ACL 2020): multi-level title representations
matched token by token with every clicked news, the matching images stacked and read by 3D CNNs.

Shape letters: B users, C candidates, M history (fixed: `max_history`), L title tokens (fixed:
`title_len`), E token width, F HDC filters, V levels, N (user, candidate) pairs.

News (HDC): the title's token vectors (the news side's: word embeddings initialised from BERT's
input embeddings in encoder mode "words"; the original used GloVe) go through `levels` stacked
dilated convolutions, dilation rates 1, 2, 3 (window `window`, each followed by layer
normalisation and ReLU), each level a representation of the title at a coarser grain: d^v [L, F].

Levels: with `embedding_level`, the token vectors themselves are level 0 (so V = levels + 1
images per clicked news; an exact word match shows there), then the HDC levels.

Matching: for a candidate c and each clicked news k, at every level v the image
    Q[v, k, i, j] = <d^v_k,i, d^v_c,j> / sqrt(F)          (token i of k against token j of c)
and the images of all clicked news stacked give the 3D volume Q [V, M, L, L] (levels as input
channels), zero at padded history slots and padded tokens. Two 3D convolution + 3D max-pooling
stages (channels `channels`, `channels // 2`, kernel 3, pooling 3) read it, and a dense layer
maps the flattened result to the score. The volume has a fixed size (history padded or cut to
the `max_history` most recent clicks, titles padded to `title_len`), as in the original, so the
dense layer's input is fixed and padding changes nothing.

Memory: the volume is N x V x M x L x L; pairs are scored `chunk` at a time (bounds memory when
scoring; training holds a batch's activations, so train with sampled negatives, as the paper did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rmbert.models.base import Recommender
from rmbert.types import NewsRepr


@dataclass(frozen=True)
class FIMConfig:
    dim: int = 384  # E: the news side's token width (set from the encoder)
    filters: int = 150  # F
    window: int = 3
    levels: int = 3  # dilation rates 1..levels
    embedding_level: bool = True  # the word vectors themselves as level 0
    channels: int = 32  # first 3D convolution's channels (the second has half)
    dropout: float = 0.2
    chunk: int = 256  # pairs per 3D-CNN pass
    # resolved from train.max_history and encoder.max_title_len
    max_history: int = 50  # M
    title_len: int = 30  # L


class HDC(nn.Module):
    """Hierarchical dilated convolution: tokens [N, L', E], mask [N, L'] -> [N, V, L', F]."""

    def __init__(self, dim: int, filters: int, window: int, levels: int, dropout: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(dim if v == 1 else filters, filters, window, dilation=v, padding=v * (window // 2))
            for v in range(1, levels + 1)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(filters) for _ in range(levels))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        h, out = self.drop(x) * m, []
        for conv, norm in zip(self.convs, self.norms):
            h = torch.relu(norm(conv(h.transpose(1, 2)).transpose(1, 2))) * m  # padding stays zero
            out.append(h)
        return torch.stack(out, 1)


class FIMState:
    def __init__(self, d: list[torch.Tensor]) -> None:
        self.d = d  # per level [B, M, L, F] (level 0: [B, M, L, E]) the clicked news', zero at padding


class FIM(Recommender):
    name = "fim"
    encodes_news = True
    needs_history_tokens = True

    def __init__(self, cfg: FIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hdc = HDC(cfg.dim, cfg.filters, cfg.window, cfg.levels, cfg.dropout)
        c1, c2 = cfg.channels, max(cfg.channels // 2, 1)
        self.cnn = nn.Sequential(
            nn.Conv3d(cfg.levels + cfg.embedding_level, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(3, 3, ceil_mode=True),
            nn.Conv3d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(3, 3, ceil_mode=True),
            nn.Flatten(),
        )
        side = [cfg.max_history, cfg.title_len, cfg.title_len]
        for _ in range(2):
            side = [math.ceil(s / 3) for s in side]
        self.out = nn.Linear(c2 * side[0] * side[1] * side[2], 1)

    def encode_news(self, news: NewsRepr) -> list[torch.Tensor]:
        """[B, K, L', E] tokens -> per level [B, K, L, F] (level 0: the tokens, [B, K, L, E]),
        zero at padded tokens, padded to L."""
        assert news.tokens is not None and news.mask is not None
        x, m = news.tokens, news.mask
        lead, L = x.shape[:2], x.shape[2]
        if L > self.cfg.title_len:
            x, m, L = x[:, :, : self.cfg.title_len], m[:, :, : self.cfg.title_len], self.cfg.title_len
        d = self.hdc(x.reshape(-1, L, x.shape[-1]), m.reshape(-1, L)).view(*lead, -1, L, self.cfg.filters)
        out = list(d.unbind(2))  # V x [B, K, L', F]
        if self.cfg.embedding_level:
            out.insert(0, x * m[..., None])
        return [nn.functional.pad(t, (0, 0, 0, self.cfg.title_len - L)) for t in out]

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> FIMState:
        M = self.cfg.max_history
        out = []
        for d in self.encoded(hist):  # [B, M', L, F]
            d = d * hist_mask[:, :, None, None].to(d.dtype)
            d = d[:, -M:]  # at most the M most recent clicks (the history is oldest first)
            out.append(nn.functional.pad(d, (0, 0, 0, 0, 0, M - d.shape[1])))
        return FIMState(out)

    def score_candidates(self, state: FIMState, cand: NewsRepr) -> torch.Tensor:
        c = self.encoded(cand)  # per level [B, C, L, F]
        B, C = c[0].shape[:2]
        step = max(1, self.cfg.chunk // C)  # users per pass: about `chunk` pairs
        out = []
        for s in range(0, B, step):
            q = torch.stack(
                [
                    torch.einsum("bmif,bcjf->bcmij", h[s : s + step], x[s : s + step]) * x.shape[-1] ** -0.5
                    for h, x in zip(state.d, c)
                ],
                2,
            )  # [b, C, V, M, L, L]: the matching images of every level, every clicked news
            out.append(self.out(self.cnn(q.flatten(0, 1)))[:, 0])  # [b C]
        return torch.cat(out).view(B, C)
