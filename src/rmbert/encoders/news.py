"""The news side of a recommender: store rows in, news representations out, in every encoder mode.

    frozen  vectors gathered from the news store (nothing encoded during training)
    top-k   lower-layer states gathered from the store, the top k BERT layers run and trained
    full    token ids gathered from the store, BERT run and trained end to end

In top-k and full modes each unique news of a batch is encoded once and scattered back
(`dedup`). Shape letters: B, M, C, L, D as elsewhere; U unique news in a batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rmbert.encoders.bert import BertNewsEncoder, NewsRepr
from rmbert.encoders.store import NewsStore

STORE_KIND = {"frozen": "vectors", "top-k": "lower", "full": "tokens"}


def _gather(a: np.ndarray, rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[rows.cpu().numpy()])).to(dtype)


class NewsSide(nn.Module):
    def __init__(
        self, mode: str, encoder: BertNewsEncoder, store: NewsStore, top_k: int = 1, dedup: bool = True
    ):
        super().__init__()
        if mode not in STORE_KIND:
            raise ValueError(f"encoder mode must be one of {', '.join(STORE_KIND)}, not {mode!r}")
        self.mode, self.top_k, self.dedup = mode, top_k, dedup
        self.encoder = encoder
        if mode == "frozen":
            encoder.requires_grad_(False)
        elif mode == "top-k":
            encoder.freeze_below(top_k)
        else:
            encoder.requires_grad_(True)
        self.store = store
        self.stats = {"news_total": 0, "news_unique": 0}

    def set_store(self, store: NewsStore) -> None:
        self.store = store

    def _encode_rows(self, rows: torch.Tensor) -> NewsRepr:
        """Encode store rows [U] with the trainable encoder -> NewsRepr [U, ...]."""
        a = self.store.arrays
        ids, attn = _gather(a["input_ids"], rows, torch.int64), _gather(a["attn"], rows, torch.bool)
        dev = next(self.encoder.parameters()).device
        ids, attn = ids.to(dev), attn.to(dev)
        if self.mode == "full":
            return self.encoder(ids, attn)
        hidden = _gather(a["hidden"], rows).to(dev)
        return self.encoder.upper(hidden, ids, attn, self.top_k)

    def forward(self, hist: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, NewsRepr]:
        """hist [B, M], cand [B, C] store rows -> H [B, M, D], candidates NewsRepr [B, C, ...]."""
        B, M = hist.shape
        C = cand.shape[1]
        dev = hist.device
        if self.mode == "frozen":
            a = self.store.arrays
            H = _gather(a["cls"], hist).to(dev)
            cmask = _gather(a["mask"], cand, torch.bool)  # [B, C, L]
            Lb = max(int(cmask.any(dim=(0, 1)).nonzero().max()) + 1 if cmask.any() else 1, 1)
            rows = cand.cpu().numpy()
            tokens = torch.from_numpy(np.ascontiguousarray(a["tokens"][rows, :Lb])).float().to(dev)
            x = _gather(a["cls"], cand).to(dev)
            return H, NewsRepr(cls=x, tokens=tokens, mask=cmask[:, :, :Lb].to(dev))
        flat = torch.cat([hist.reshape(-1), cand.reshape(-1)])
        self.stats["news_total"] += flat.numel()
        if self.dedup:
            uniq, inv = torch.unique(flat, return_inverse=True)
            self.stats["news_unique"] += uniq.numel()
            r = self._encode_rows(uniq)
            hi, ci = inv[: B * M].to(r.cls.device), inv[B * M :].to(r.cls.device)
        else:
            self.stats["news_unique"] += flat.numel()
            r = self._encode_rows(flat)
            hi = torch.arange(B * M, device=r.cls.device)
            ci = torch.arange(B * M, B * M + B * C, device=r.cls.device)
        H = r.cls[hi].view(B, M, -1)
        x = r.cls[ci].view(B, C, -1)
        L = r.tokens.shape[1]
        return H, NewsRepr(cls=x, tokens=r.tokens[ci].view(B, C, L, -1), mask=r.mask[ci].view(B, C, L))
