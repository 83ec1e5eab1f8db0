"""The small types every layer shares: what a news side hands a recommender, and what scoring returns.

Shape letters: N news, B users, K news per user (M clicked or C candidates), L title tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NewsRepr:
    cls: torch.Tensor  # [N, D] (or [B, K, D])
    tokens: torch.Tensor | None  # [N, L, D]; None where only the [CLS] vectors are needed
    mask: torch.Tensor | None  # [N, L] bool
    index: torch.Tensor | None = None  # [B, K] into N: positions of deduplicated news, if any
    # per-news side inputs of the same news, by name (a recommender's `side_inputs`): [B, K, ...]
    # rows of per-store-row tables, e.g. category ids [B, K] or title token ids [B, K, L]
    extra: dict[str, torch.Tensor] | None = None
    # the recommender's own encoding of these news (`Recommender.encode_news`), [B, K, ...] (a
    # tensor or a list of them), computed once per distinct news of a batch; None: not yet
    encoded: Any = None


@dataclass
class Scores:
    """What scoring returns: click logits, and (when asked) attention weights by name, e.g.
    RMBERT's `title` [B, C, p, L] and `history` [B, C, p, M], as Hugging Face models return attentions."""

    logits: torch.Tensor  # [B, C]
    attentions: dict[str, torch.Tensor] | None = None
