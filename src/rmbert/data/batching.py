"""Batches grouped by impression, so each user side is computed once per impression.

Shape letters: B impressions (or click groups), M history items, C candidates.
News are referred to by store rows (0 = padding or a news missing from news.tsv).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rmbert.data.mind import Impressions


@dataclass
class Batch:
    hist: torch.Tensor  # [B, M] int64 store rows, most recent last, 0 = padding
    hist_mask: torch.Tensor  # [B, M] bool
    cand: torch.Tensor  # [B, C] int64 store rows
    cand_mask: torch.Tensor  # [B, C] bool (False = padding)
    labels: torch.Tensor  # [B, C] float32 (0 where padded)
    users: torch.Tensor  # [B] int64 user index (0 = unknown)
    rows: np.ndarray  # [B] impression rows in the split

    def to(self, device: torch.device) -> Batch:
        t = {
            k: v.to(device, non_blocking=True)
            for k, v in self.__dict__.items()
            if isinstance(v, torch.Tensor)
        }
        return Batch(**t, rows=self.rows)


def pad_rows(
    ptr: np.ndarray, values: np.ndarray, rows: np.ndarray, max_len: int = 0, keep_last: bool = False
):
    """Rows of a CSR array as a padded [B, W] matrix and mask (W = longest, capped at max_len)."""
    starts, ends = ptr[rows], ptr[rows + 1]
    lengths = ends - starts
    if max_len and keep_last:
        starts = np.maximum(starts, ends - max_len)
    elif max_len:
        ends = np.minimum(ends, starts + max_len)
    lengths = ends - starts
    W = max(int(lengths.max()) if len(lengths) else 0, 1)
    cols = np.arange(W)
    mask = cols[None, :] < lengths[:, None]
    idx = np.where(mask, starts[:, None] + cols[None, :], 0)
    out = np.where(mask, values[idx] if len(values) else 0, 0)
    return out, mask


class ImpressionBatcher:
    """Turns a split's impressions into batches of store rows."""

    def __init__(
        self, imps: Impressions, news_rows: np.ndarray, max_history: int, user_index: dict[str, int]
    ):
        self.imps = imps
        # news row -> store row; missing news (-1) -> 0. int32, as the split's own arrays: these
        # two hold a row per history item and per candidate (167M at MIND-large's test split)
        rows = np.asarray(news_rows).astype(np.int32)
        self.hist_rows = rows[imps.hist] if len(imps.hist) else np.zeros(0, np.int32)
        self.cand_rows = rows[np.maximum(imps.cand, 0)]
        self.cand_rows[imps.cand < 0] = 0
        self.max_history = max_history
        ptr = imps.cand_ptr
        self.clicks = (
            np.add.reduceat(imps.labels == 1, ptr[:-1], dtype=np.int64)
            if len(imps)
            else np.zeros(0, np.int64)
        )
        self.users = np.array(
            [user_index.get(imps.users[u], 0) for u in range(len(imps.users))], dtype=np.int64
        )

    def _history(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return pad_rows(self.imps.hist_ptr, self.hist_rows, rows, self.max_history, keep_last=True)

    def batch(self, rows: np.ndarray) -> Batch:
        """All candidates of the impressions at `rows`."""
        hist, hmask = self._history(rows)
        cand, cmask = pad_rows(self.imps.cand_ptr, self.cand_rows, rows)
        labels, _ = pad_rows(self.imps.cand_ptr, self.imps.labels, rows)
        return self._make(rows, hist, hmask, cand, cmask, np.maximum(labels, 0) * cmask)

    def _make(self, rows, hist, hmask, cand, cmask, labels) -> Batch:
        return Batch(
            hist=torch.from_numpy(hist.astype(np.int64)),
            hist_mask=torch.from_numpy(hmask),
            cand=torch.from_numpy(cand.astype(np.int64)),
            cand_mask=torch.from_numpy(cmask),
            labels=torch.from_numpy(labels.astype(np.float32)),
            users=torch.from_numpy(self.users[self.imps.user_idx[rows]]),
            rows=rows,
        )

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every impression once, batched by similar candidate counts (less padding)."""
        sizes = np.diff(self.imps.cand_ptr)
        order = np.argsort(sizes, kind="stable")
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s : s + batch_size])

    def epoch_plan(self, epoch: int, seed: int, negatives: int, bucket: int = 0) -> np.ndarray:
        """The units of one epoch in order: impression rows, or (row, click position) pairs with negatives.

        With `bucket` = the batch size (impressions, all candidates), each run of 64 batches of a
        random order is sorted by candidate count before it is cut into batches, and the batches
        are then shuffled: a batch pads to its longest impression, so similar sizes together
        halve the padded rows while every batch stays a random draw of the epoch."""
        rng = np.random.default_rng([seed, epoch])
        if negatives <= 0:
            perm = rng.permutation(len(self.imps))
            if bucket <= 1:
                return perm
            sizes = np.diff(self.imps.cand_ptr)
            chunk = 64 * bucket
            parts = [perm[s : s + chunk] for s in range(0, len(perm), chunk)]
            parts = [p[np.argsort(sizes[p], kind="stable")] for p in parts]
            batches = [p[s : s + bucket] for p in parts for s in range(0, len(p), bucket)]
            full = [b for b in batches if len(b) == bucket]
            short = [b for b in batches if len(b) < bucket]  # only the last chunk ends short: kept last
            order = rng.permutation(len(full))
            return np.concatenate([full[i] for i in order] + short) if batches else perm
        clicks = np.flatnonzero(self.imps.labels == 1)
        group = np.searchsorted(self.imps.cand_ptr, clicks, side="right") - 1
        units = np.stack([group, clicks], axis=1)
        return units[rng.permutation(len(units))]

    def rows_in(self, units: np.ndarray, negatives: int) -> float:
        """Candidate rows (unpadded) that `train_batch(units, negatives)` scores."""
        ptr = self.imps.cand_ptr
        if negatives <= 0:
            return float((ptr[units + 1] - ptr[units]).sum())
        rows = units[:, 0]
        has_neg = (ptr[rows + 1] - ptr[rows]) > self.clicks[rows]
        return float(len(rows) + negatives * has_neg.sum())

    def train_batch(self, units: np.ndarray, negatives: int, rng: np.random.Generator) -> Batch:
        if negatives <= 0:
            return self.batch(units)
        rows, clicks = units[:, 0], units[:, 1]
        ptr, labels = self.imps.cand_ptr, self.imps.labels
        cand = np.zeros((len(rows), negatives + 1), dtype=np.int64)
        cmask = np.ones_like(cand, dtype=bool)
        cand[:, 0] = self.cand_rows[clicks]
        for b, r in enumerate(rows):
            neg = np.flatnonzero(labels[ptr[r] : ptr[r + 1]] == 0) + ptr[r]
            if len(neg) == 0:
                cmask[b, 1:] = False
                continue
            pick = rng.choice(neg, negatives, replace=len(neg) < negatives)
            cand[b, 1:] = self.cand_rows[pick]
        hist, hmask = self._history(rows)
        y = np.zeros_like(cand, dtype=np.float32)
        y[:, 0] = 1.0
        return self._make(rows, hist, hmask, cand, cmask, y)
