"""Layers the baselines share. Shape letters: N items, K positions, E input width, Q query width."""

from __future__ import annotations

import torch
from torch import nn

from rmbert.models.base import masked_softmax


class AdditiveAttention(nn.Module):
    """a_k = softmax_k(q . tanh(W x_k + b)); returns sum_k a_k x_k [N, E] (NRMS, LSTUR, NPA)."""

    def __init__(self, dim: int, query_dim: int = 200) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, query_dim)
        self.query = nn.Parameter(torch.randn(query_dim) * 0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, K, E], mask [N, K]; `query` [N, Q] replaces the learned one (personalised attention)."""
        keys = torch.tanh(self.proj(x))  # [N, K, Q]
        q = self.query if query is None else query[:, None, :]
        w = masked_softmax((keys * q).sum(-1), mask)  # [N, K]
        return torch.einsum("nk,nke->ne", w, x)


class TitleCNN(nn.Module):
    """Word CNN over a title (LSTUR, NPA news encoders): [N, L, E] -> [N, L, F], padding zeroed."""

    def __init__(self, dim: int, filters: int, window: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, filters, window, padding=window // 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask[..., None]  # padding reads as zeros, whatever the input holds there
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # [N, L, F]
        return self.drop(h) * mask[..., None]


def flatten_news(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """[B, K, L, E], [B, K, L] -> [B*K, L, E], [B*K, L] and the leading shape to restore."""
    lead = tuple(x.shape[:2])
    return x.reshape(-1, *x.shape[2:]), mask.reshape(-1, mask.shape[-1]), lead
