"""Evaluation and prediction through the news store, with the official metrics."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from rmbert.assemble import NewsRecModel
from rmbert.data.batching import ImpressionBatcher
from rmbert.encoders.store import NewsStore
from rmbert.metrics import mind_metrics


@torch.no_grad()
def score_impressions(
    model: NewsRecModel,
    batcher: ImpressionBatcher,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> np.ndarray:
    """Click logits for every candidate row of the split, in file order.

    A recommender with a scoring form (`Recommender.scoring_form`, RMBERT's folded form) has
    each candidate news's terms computed once for the split first: a news is a candidate in
    many impressions (about 88 times each at MIND-large's dev split)."""
    was_training = model.training
    model.eval()
    device = device or torch.device("cpu")
    imps = batcher.imps
    scores = np.zeros(len(imps.cand), dtype=np.float32)
    n_batches = (len(imps) + batch_size - 1) // batch_size
    form = model.rec.scoring_form()
    if form is not None:
        rows = np.flatnonzero(np.bincount(batcher.cand_rows, minlength=1))  # the split's candidate news
        rows = np.union1d(rows, [0])  # row 0: padding and news missing from news.tsv
        terms = model.split_terms(form, rows, progress=progress)
        local = torch.zeros(int(rows[-1]) + 1, dtype=torch.int64, device=device)
        local[torch.from_numpy(rows).to(device)] = torch.arange(len(rows), device=device)
    for batch in tqdm(
        batcher.eval_batches(batch_size), total=n_batches, desc=desc, unit="batch", disable=not progress
    ):
        b = batch.to(device)
        if form is None:
            logits = model(b).float().cpu().numpy()  # [B, C]
        else:
            logits = model.score_terms(form, b, terms, local).float().cpu().numpy()
        for j, r in enumerate(batch.rows):
            s, e = imps.cand_ptr[r], imps.cand_ptr[r + 1]
            scores[s:e] = logits[j, : e - s]
    model.train(was_training)
    return scores


def jsonable(obj):
    """obj with every non-finite float replaced by None: JSON output never holds NaN."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def missing_candidates(split_path, imps) -> str | None:
    """A warning when candidates name news missing from news.tsv (they score as the empty news)."""
    rows = int((imps.cand < 0).sum())
    if not rows:
        return None
    return (
        f"{split_path}: {rows} of {len(imps.cand)} candidate rows name {len(imps.missing_candidate_ids)} news ids "
        "missing from news.tsv; they are scored as the empty news"
    )


def evaluate_scores(batcher: ImpressionBatcher, scores: np.ndarray) -> dict:
    imps = batcher.imps
    if not imps.has_labels:
        raise ValueError("this split has no labels (a test split): use `rmbert predict` instead")
    return mind_metrics(imps.labels, scores, imps.cand_ptr)


def cosine_baseline_scores(store: NewsStore, batcher: ImpressionBatcher, pooling: str = "mean") -> np.ndarray:
    """No-training baseline: max cosine similarity of a candidate's frozen news vector to the
    history's, with mean-pooled title vectors (a sentence encoder's own vectors) or h[CLS]."""
    vec = np.asarray(store.pooled() if pooling == "mean" else store.arrays["cls"], dtype=np.float32)
    norm = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)
    imps = batcher.imps
    scores = np.zeros(len(imps.cand), dtype=np.float32)
    for i in range(len(imps)):
        h = batcher.hist_rows[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]
        c = batcher.cand_rows[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
        if len(h):
            scores[imps.cand_ptr[i] : imps.cand_ptr[i + 1]] = (norm[c] @ norm[h].T).max(axis=1)
    return scores
