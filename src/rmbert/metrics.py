"""MIND's official metrics, vectorized over impressions, and the leaderboard `prediction.zip`.

Impressions are CSR groups: rows `ptr[i]:ptr[i+1]` of `labels`/`scores` belong to impression `i`.
Each metric is computed per impression, then averaged over impressions (the official
definition). Impressions without both a click and a non-click are skipped and counted.

Tie handling follows the official scorer: AUC counts ties half (as scikit-learn's
roc_auc_score); MRR and nDCG order by `np.argsort(score)[::-1]` with a stable sort, so
among equal scores the later candidate comes first.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np

METRIC_KEYS = ("auc", "mrr", "ndcg@5", "ndcg@10")
BLOCK_ROWS = 1 << 21  # candidate rows per block of the metrics, ranks and prediction.zip
PARSE_LINES = 50_000  # submission lines parsed at a time (about 1.9M ranks at MIND's 37 per line)


def _groups(ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.asarray(ptr, dtype=np.int64)
    sizes = np.diff(ptr)
    group = np.repeat(np.arange(len(sizes)), sizes)
    return group, sizes


def blocks(ptr: np.ndarray, rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive impression ranges [a, b) covering every impression, each of at most `rows`
    (default BLOCK_ROWS) candidate rows, or one impression if it alone has more."""
    ptr, rows = np.asarray(ptr, dtype=np.int64), rows or BLOCK_ROWS
    out, a, G = [], 0, len(ptr) - 1
    while a < G:
        b = int(np.searchsorted(ptr, ptr[a] + rows, side="right")) - 1  # last b with ptr[b] - ptr[a] <= rows
        b = min(max(b, a + 1), G)
        out.append((a, b))
        a = b
    return out


def per_impression(
    labels: np.ndarray, scores: np.ndarray, ptr: np.ndarray, block_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Per-impression AUC, MRR, nDCG@5, nDCG@10 and a `valid` mask (has a click and a non-click).

    Computed `block_rows` (BLOCK_ROWS) candidate rows at a time (each metric is one impression's), so
    the working memory is a few blocks, not a few copies of all rows (89M at MIND-large's test)."""
    ptr = np.asarray(ptr, dtype=np.int64)
    if len(labels) != len(scores) or ptr[-1] != len(labels):
        raise ValueError(
            f"labels ({len(labels)}), scores ({len(scores)}) and ptr (ends at {ptr[-1]}) disagree"
        )
    parts = [
        _per_impression(labels[ptr[a] : ptr[b]], scores[ptr[a] : ptr[b]], ptr[a : b + 1] - ptr[a])
        for a, b in blocks(ptr, block_rows)
    ] or [_per_impression(labels, scores, ptr)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _per_impression(labels: np.ndarray, scores: np.ndarray, ptr: np.ndarray) -> dict[str, np.ndarray]:
    """`per_impression` of one block (ptr from 0)."""
    y = (np.asarray(labels) > 0).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    group, sizes = _groups(ptr)
    G, n = len(sizes), len(y)
    pos_count = np.bincount(group, weights=y, minlength=G)
    neg_count = sizes - pos_count
    valid = (pos_count > 0) & (neg_count > 0)

    # One float sort gives dense score ranks (ties equal); the orders within impressions are
    # then single sorts of integer keys (impressions are contiguous: group-major keys).
    _, dense = np.unique(s, return_inverse=True)
    dense = dense.reshape(-1).astype(np.int64)
    K = int(dense.max()) + 1 if n else 1

    # AUC = (sum of positive ranks - P(P+1)/2) / (P N), with tied scores sharing their average rank.
    order = np.argsort(group * K + dense, kind="stable")
    gs, ds, ys = group[order], dense[order], y[order]
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (gs[1:] != gs[:-1]) | (ds[1:] != ds[:-1])
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_start, n))
    pos_in_group = np.arange(n) - ptr[gs] + 1  # 1-based rank, ascending score
    avg_rank = np.repeat(pos_in_group[run_start] + (run_len - 1) / 2.0, run_len)
    rank_sum = np.bincount(gs, weights=avg_rank * ys, minlength=G)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - pos_count * (pos_count + 1) / 2.0) / (pos_count * neg_count)

    # MRR and DCG: descending score, ties -> later candidate first (stable argsort reversed).
    pos = np.arange(n) - ptr[group]
    width = int(sizes.max()) if G else 1
    order = np.argsort((group * K + (K - 1 - dense)) * width + (width - 1 - pos))
    gs, ys = group[order], y[order]
    rank0 = np.arange(n) - ptr[gs]
    with np.errstate(divide="ignore", invalid="ignore"):
        mrr = np.bincount(gs, weights=ys / (rank0 + 1), minlength=G) / pos_count
    gain = ys / np.log2(rank0 + 2.0)  # 2^y - 1 = y for clicks
    # ideal DCG@k of binary labels: the clicks first -> sum over the first min(P, k) positions
    ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(10) + 2.0))])
    out = {"auc": auc, "mrr": mrr, "valid": valid}
    for k in (5, 10):
        dcg = np.bincount(gs, weights=gain * (rank0 < k), minlength=G)
        idcg = ideal[np.minimum(pos_count, k).astype(np.int64)]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"ndcg@{k}"] = dcg / idcg
    return out


def mind_metrics(labels: np.ndarray, scores: np.ndarray, ptr: np.ndarray) -> dict[str, float | int]:
    """Official MIND metrics averaged over impressions; `skipped` counts single-class impressions."""
    per = per_impression(labels, scores, ptr)
    valid = per["valid"]
    out: dict[str, float | int] = {}
    for key in METRIC_KEYS:
        out[key] = float(per[key][valid].mean()) if valid.any() else float("nan")
    out["impressions"] = int(valid.sum())
    out["skipped"] = int((~valid).sum())
    return out


def pooled_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC over all rows at once. NOT the MIND metric; here to show the difference."""
    y = np.asarray(labels) > 0
    return float(per_impression(y, scores, np.array([0, len(y)]))["auc"][0])


def ranks_from_scores(scores: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate within its impression (1 = highest score).

    Ties are broken as the official MRR/nDCG order them (the later candidate first), so the
    ranks of a submission give the same MRR and nDCG as the scores they came from.
    """
    ptr = np.asarray(ptr, dtype=np.int64)
    ranks = np.empty(len(scores), dtype=np.int64)
    for a, b in blocks(ptr):
        lo, hi = ptr[a], ptr[b]
        s = np.asarray(scores[lo:hi], dtype=np.float64)
        group, _ = _groups(ptr[a : b + 1] - lo)
        order = np.lexsort((-np.arange(len(s)), -s, group))
        ranks[lo + order] = np.arange(len(s)) - (ptr[a + group[order]] - lo) + 1
    return ranks


def write_prediction_zip(path: str | Path, imp_ids: np.ndarray, ptr: np.ndarray, scores: np.ndarray) -> Path:
    """Write the leaderboard file: prediction.txt at the zip's root, `ImpId [r1,r2,...]` per line.

    Streamed into the zip a block of impressions at a time (the text of MIND-large's test is
    about 300 MB), to a temporary file first and renamed, so an existing zip is never left
    half-written.
    """
    path = Path(path)
    ptr = np.asarray(ptr, dtype=np.int64)
    widest = int(np.diff(ptr).max()) if len(ptr) > 1 else 0
    upper = int(ptr[-1]) * (len(str(widest)) + 1) + len(ptr) * 24  # bytes, at most
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with (
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("prediction.txt", "w", force_zip64=upper >= zipfile.ZIP64_LIMIT) as f,
    ):
        for a, b in blocks(ptr):
            ranks = ranks_from_scores(scores[ptr[a] : ptr[b]], ptr[a : b + 1] - ptr[a])
            buf = io.StringIO()
            for i in range(a, b):
                r = ranks[ptr[i] - ptr[a] : ptr[i + 1] - ptr[a]]
                buf.write(f"{int(imp_ids[i])} [{','.join(map(str, r.tolist()))}]\n")
            f.write(buf.getvalue().encode())
    os.replace(tmp, path)
    return path


class SubmissionError(ValueError):
    """A malformed submission; the message names prediction.txt and the line."""


_LINE = re.compile(r"^\s*(\S+)\s+\[([^\]]*)\]\s*$")
_RANKS = re.compile(r"^-?[0-9]+(,-?[0-9]+)*$")


def read_prediction_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "prediction.txt"]
            if not names:
                raise SubmissionError(f"{path}: no prediction.txt inside the zip")
            data = zf.read(names[0])
    except zipfile.BadZipFile:
        raise SubmissionError(f"{path}: not a zip file") from None
    except FileNotFoundError:
        raise SubmissionError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: prediction.txt is not UTF-8") from None
    lines = text.splitlines()
    return lines


def score_submission(pred_lines: list[str], imp_ids: np.ndarray, ptr: np.ndarray, labels: np.ndarray) -> dict:
    """Score submission lines against the truth exactly as the official MIND scorer does.

    Line i answers truth impression i (file order). A missing line counts as all-equal ranks;
    a wrong impression id, a wrong number of ranks or a malformed line is an error naming the line.
    """
    ptr = np.asarray(ptr, dtype=np.int64)
    scores = np.ones(int(ptr[-1]), dtype=np.float64)
    missing = 0
    texts: list[str] = []  # validated rank lists, parsed PARSE_LINES lines at a time below
    starts: list[int] = []
    for i, imp in enumerate(imp_ids):
        n = int(ptr[i + 1] - ptr[i])
        if i >= len(pred_lines) or not pred_lines[i].strip():
            missing += 1
            continue
        m = _LINE.match(pred_lines[i])
        if m is None:
            raise SubmissionError(f"prediction.txt:{i + 1}: invalid line, expected 'ImpId [r1,r2,...]'")
        if m.group(1) != str(int(imp)):
            raise SubmissionError(
                f"prediction.txt:{i + 1}: impression id {m.group(1)} does not match the truth's {int(imp)}"
            )
        text = m.group(2).replace(" ", "")
        if not _RANKS.match(text):
            raise SubmissionError(f"prediction.txt:{i + 1}: ranks must be integers separated by commas")
        count = text.count(",") + 1
        if count != n:
            raise SubmissionError(f"prediction.txt:{i + 1}: {count} ranks for {n} candidates")
        texts.append(text)
        starts.append(i)
    for j in range(0, len(texts), PARSE_LINES):  # a Python str per rank only for a block's ranks
        ranks = np.array(",".join(texts[j : j + PARSE_LINES]).split(","), dtype=np.int64)
        rows = np.asarray(starts[j : j + PARSE_LINES])
        lengths = ptr[rows + 1] - ptr[rows]
        offsets = np.repeat(ptr[rows] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        if (ranks < 1).any():
            first = int(np.flatnonzero(ranks < 1)[0])
            line = int(rows[int(np.searchsorted(np.cumsum(lengths), first, side="right"))]) + 1
            raise SubmissionError(f"prediction.txt:{line}: ranks must be 1 or more")
        scores[offsets + np.arange(len(ranks))] = 1.0 / ranks
    out = mind_metrics(labels, scores, ptr)
    out["missing_lines"] = missing
    return out
