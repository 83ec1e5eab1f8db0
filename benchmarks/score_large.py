"""Scoring a MIND-large-sized submission: 376k impressions, about 37 candidates each.

Writes a synthetic labeled truth split and a random prediction.zip, then times the parts of
`rmbert score` and the vectorized metrics alone. Prints one JSON object (last line).
Usage: python benchmarks/score_large.py [--impressions 376000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rmbert.data.mind import load_split
from rmbert.metrics import mind_metrics, read_prediction_lines, score_submission, write_prediction_zip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impressions", type=int, default=376_000)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench" / "score-large")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    truth = a.out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    sizes = rng.integers(5, 70, a.impressions)  # mean about 37
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    n_news = 20000
    cands = rng.integers(0, n_news, ptr[-1])
    labels = (rng.random(ptr[-1]) < 0.04).astype(np.int8)
    labels[ptr[:-1]] = 1  # every impression has a click
    t0 = time.time()
    with open(truth / "news.tsv", "w") as f:
        for j in range(n_news):
            f.write(f"N{j}\tnews\tsub\ttitle {j}\t\t\t[]\t[]\n")
    with open(truth / "behaviors.tsv", "w") as f:
        for i in range(a.impressions):
            c, y = cands[ptr[i] : ptr[i + 1]], labels[ptr[i] : ptr[i + 1]]
            imps = " ".join(f"N{x}-{v}" for x, v in zip(c.tolist(), y.tolist()))
            f.write(f"{i + 1}\tU{i % 50000}\t11/15/2019 8:55:22 AM\tN1 N2\t{imps}\n")
    t_write = time.time() - t0
    scores = rng.random(ptr[-1])
    zp = write_prediction_zip(a.out / "prediction.zip", np.arange(1, a.impressions + 1), ptr, scores)
    t0 = time.time()
    split = load_split(truth)
    t_load = time.time() - t0
    t0 = time.time()
    lines = read_prediction_lines(zp)
    t_read = time.time() - t0
    imps = split.impressions
    t0 = time.time()
    result = score_submission(lines, imps.imp_ids, imps.cand_ptr, imps.labels)
    t_score = time.time() - t0
    t0 = time.time()
    mind_metrics(imps.labels, scores, imps.cand_ptr)
    t_metrics = time.time() - t0
    print(
        json.dumps(
            {
                "impressions": a.impressions,
                "candidate_rows": int(ptr[-1]),
                "write_truth_s": round(t_write, 1),
                "parse_truth_s": round(t_load, 1),
                "read_zip_s": round(t_read, 1),
                "parse_and_score_s": round(t_score, 1),
                "metrics_only_s": round(t_metrics, 2),
                "score_total_s": round(t_load + t_read + t_score, 1),
                "auc": round(result["auc"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
