"""The news side of a recommender: store rows in, news representations out, in every encoder mode.

    frozen  BERT vectors gathered from the news store (nothing encoded during training)
    top-k   lower BERT layers gathered from the store, the top k layers run and trained
    full    token ids gathered from the store, BERT run and trained end to end
    lstm    token ids -> trainable word embeddings (from BERT's) -> Bi-LSTM (the w/o BERT ablation)
    words   token ids -> trainable word embeddings only (baselines' own news encoders)

In every mode but frozen, each unique news of a batch is encoded once and scattered back
(`dedup`). Shape letters: B, M, C, L, D as elsewhere; U unique news in a batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rmbert.encoders.bert import BertNewsEncoder, mean_pool
from rmbert.encoders.lstm import LSTMNewsEncoder, WordNewsEncoder
from rmbert.encoders.store import NewsStore
from rmbert.types import NewsRepr

STORE_KIND = {"frozen": "vectors", "top-k": "lower", "full": "tokens", "lstm": "tokens", "words": "tokens"}


def _gather(a: np.ndarray, rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[rows.cpu().numpy()])).to(dtype)


def make_encoder(mode: str, bert: BertNewsEncoder) -> nn.Module:
    """The trainable news encoder of a mode (BERT itself for frozen, top-k and full)."""
    emb = bert.bert.get_input_embeddings().weight.detach()
    if mode == "lstm":
        return LSTMNewsEncoder(emb, bert.sep_token_id, bert.max_title_len, bert.dim)
    if mode == "words":
        return WordNewsEncoder(emb, bert.sep_token_id, bert.max_title_len)
    return bert


class NewsSide(nn.Module):
    """`pooling` chooses the news vector: "cls" (h[CLS], the paper) or "mean" (of the title tokens)."""

    def __init__(
        self,
        mode: str,
        encoder: nn.Module,
        store: NewsStore,
        top_k: int = 1,
        dedup: bool = True,
        pooling: str = "cls",
    ):
        super().__init__()
        if mode not in STORE_KIND:
            raise ValueError(f"encoder mode must be one of {', '.join(STORE_KIND)}, not {mode!r}")
        self.mode, self.top_k, self.dedup, self.pooling = mode, top_k, dedup, pooling
        self.encoder = encoder
        if mode == "frozen":
            encoder.requires_grad_(False)
        elif mode == "top-k":
            encoder.freeze_below(top_k)
        else:
            encoder.requires_grad_(True)
        self.store = store
        self.stats = {"news_total": 0, "news_unique": 0}
        # Frozen vectors are standardised per dimension with statistics of the training news
        # (`fit_standardizer`): an affine reparametrisation the cells absorb exactly, which
        # removes BERT's large shared direction and eases optimisation. Identity until fitted.
        D = getattr(encoder, "dim", 0)
        for name, value in (("cls_mean", 0.0), ("cls_std", 1.0), ("tok_mean", 0.0), ("tok_std", 1.0)):
            self.register_buffer(name, torch.full((D,), value))

    def set_store(self, store: NewsStore) -> None:
        self.store = store

    def embed_words(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [..., T] (0 = padding) -> this side's word embeddings [..., T, E], zero at
        padding: for text the store does not hold (e.g. NAML's abstracts). The trainable word
        embeddings in words and lstm modes (with their dropout), else BERT's input embeddings
        (trained in full mode only)."""
        enc = self.encoder
        words = enc.words if isinstance(enc, LSTMNewsEncoder) else enc
        if isinstance(words, WordNewsEncoder):
            emb, drop = words.embed, words.drop
        else:
            emb, drop = enc.bert.get_input_embeddings(), nn.Identity()
        ids = ids.to(emb.weight.device)
        return drop(emb(ids)) * (ids > 0)[..., None]

    def vector_array(self) -> np.ndarray:
        """The store's news vectors [rows, D] for this pooling (frozen mode)."""
        return self.store.pooled() if self.pooling == "mean" else self.store.arrays["cls"]

    def _encode_rows(self, rows: torch.Tensor) -> NewsRepr:
        """Encode store rows [U] with the trainable encoder -> NewsRepr [U, ...]."""
        a = self.store.arrays
        ids, attn = _gather(a["input_ids"], rows, torch.int64), _gather(a["attn"], rows, torch.bool)
        dev = next(self.encoder.parameters()).device
        ids, attn = ids.to(dev), attn.to(dev)
        if self.mode == "top-k":
            r = self.encoder.upper(_gather(a["hidden"], rows).to(dev), ids, attn, self.top_k)
        else:
            r = self.encoder(ids, attn)
        if self.pooling == "mean":
            r.cls = mean_pool(r.tokens, r.mask)
        return r

    @torch.no_grad()
    def fit_standardizer(self, sample: int = 20000, seed: int = 0) -> None:
        """Per-dimension mean and std of the store's [CLS] and title-token vectors (frozen mode)."""
        a = self.store.arrays
        n = len(a["cls"]) - 1
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False) + 1)
        cls = torch.from_numpy(np.asarray(self.vector_array()[rows], dtype=np.float32))
        tok = torch.from_numpy(np.asarray(a["tokens"][rows], dtype=np.float32))[
            torch.from_numpy(a["mask"][rows])
        ]
        self.cls_mean.copy_(cls.mean(0))
        self.cls_std.copy_(cls.std(0).clamp(min=1e-4))
        self.tok_mean.copy_(tok.mean(0))
        self.tok_std.copy_(tok.std(0).clamp(min=1e-4))

    def standardize(self, cls: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None):
        """Apply the fitted standardisation (padding stays zero)."""
        cls = (cls - self.cls_mean) / self.cls_std
        if tokens is not None:
            tokens = (tokens - self.tok_mean) / self.tok_std * mask[..., None]
        return cls, tokens

    def _frozen(self, rows: torch.Tensor, tokens: bool) -> NewsRepr:
        """Gather stored vectors for rows [B, K]; title tokens trimmed to the batch's longest title."""
        a = self.store.arrays
        dev = rows.device
        cls = _gather(self.vector_array(), rows).to(dev)
        if not tokens:
            return NewsRepr(cls=self.standardize(cls, None, None)[0], tokens=None, mask=None)
        mask = _gather(a["mask"], rows, torch.bool)[:, :, :]  # [B, K, L]
        Lb = int(mask.any(dim=(0, 1)).nonzero().max()) + 1 if mask.any() else 1
        mask = mask[:, :, :Lb].to(dev)
        tok = torch.from_numpy(np.ascontiguousarray(a["tokens"][rows.cpu().numpy(), :Lb])).float().to(dev)
        cls, tok = self.standardize(cls, tok, mask)
        return NewsRepr(cls=cls, tokens=tok, mask=mask)

    def forward(
        self, hist: torch.Tensor, cand: torch.Tensor, hist_tokens: bool = False, cand_tokens: bool = True
    ) -> tuple[NewsRepr, NewsRepr]:
        """hist [B, M], cand [B, C] store rows -> history NewsRepr [B, M, ...], candidates [B, C, ...].

        History token states are gathered only when `hist_tokens` (models with their own news
        encoder); in frozen mode, candidate token states only when `cand_tokens`.
        """
        B, M = hist.shape
        Bc, C = cand.shape  # Bc = 1 when the candidates are a batch's unique news
        if self.mode == "frozen":
            return self._frozen(hist, hist_tokens), self._frozen(cand, cand_tokens)
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
            ci = torch.arange(B * M, B * M + Bc * C, device=r.cls.device)
        L = r.tokens.shape[1]
        h = NewsRepr(
            cls=r.cls[hi].view(B, M, -1),
            tokens=r.tokens[hi].view(B, M, L, -1) if hist_tokens else None,
            mask=r.mask[hi].view(B, M, L) if hist_tokens else None,
        )
        return h, NewsRepr(
            cls=r.cls[ci].view(Bc, C, -1),
            tokens=r.tokens[ci].view(Bc, C, L, -1),
            mask=r.mask[ci].view(Bc, C, L),
        )
