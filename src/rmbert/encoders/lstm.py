"""Encoders without BERT, over the same WordPiece tokens (word embeddings start from BERT's).

`LSTMNewsEncoder` is the paper's w/o BERT ablation: a Bi-LSTM whose final states summarise
the title (x_n) and whose per-token states are X_con. `WordNewsEncoder` only embeds the
tokens, for baselines that bring their own news encoder (NRMS, LSTUR, NPA in their original
form). Both take `[CLS] title [SEP]` ids [N, S] and return a NewsRepr over the L title tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from rmbert.types import NewsRepr


def title_part(
    ids: torch.Tensor, attn: torch.Tensor, L: int, sep_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attn [N, S] -> title token ids [N, L], mask [N, L] (no [CLS], no [SEP])."""
    tok = ids[:, 1 : L + 1].long()
    mask = attn[:, 1 : L + 1] & (tok != sep_token_id)
    pad = L - tok.shape[1]
    if pad > 0:
        tok = nn.functional.pad(tok, (0, pad))
        mask = nn.functional.pad(mask, (0, pad))
    return tok, mask


class WordNewsEncoder(nn.Module):
    def __init__(self, embeddings: torch.Tensor, sep_token_id: int, max_title_len: int, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embeddings.clone(), freeze=False, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.sep_token_id, self.max_title_len = sep_token_id, max_title_len

    @property
    def dim(self) -> int:
        return self.embed.embedding_dim

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> NewsRepr:
        tok, mask = title_part(ids, attn, self.max_title_len, self.sep_token_id)
        e = self.drop(self.embed(tok))  # [N, L, E]
        m = mask[..., None].float()
        return NewsRepr(cls=(e * m).sum(1) / m.sum(1).clamp(min=1.0), tokens=e, mask=mask)


class LSTMNewsEncoder(nn.Module):
    def __init__(
        self, embeddings: torch.Tensor, sep_token_id: int, max_title_len: int, dim: int, dropout: float = 0.2
    ):
        super().__init__()
        self.words = WordNewsEncoder(embeddings, sep_token_id, max_title_len, dropout)
        self.lstm = nn.LSTM(embeddings.shape[1], dim // 2, batch_first=True, bidirectional=True)
        self._dim = dim
        self.max_title_len = max_title_len

    @property
    def dim(self) -> int:
        return self._dim

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> NewsRepr:
        w = self.words(ids, attn)
        lengths = w.mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(w.tokens, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        X, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=self.max_title_len
        )  # [N, L, D]
        x = torch.cat([h[0], h[1]], dim=-1)  # [N, D]: forward and backward final states
        return NewsRepr(cls=x, tokens=X * w.mask[..., None], mask=w.mask)
