"""Evaluation through the news store on a MIND-small-sized planted split (73k dev impressions).

Prints one JSON object (last line) with `impressions_per_s`, `peak_rss_gib`, the time to
encode the split's news into the store (once; later runs reuse it) and the metrics.
Usage: python benchmarks/evaluate_throughput.py [--users 73000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import peak_rss_gib, planted, quick_run

from rmbert.data.mind import load_split
from rmbert.evaluate import evaluate_scores, score_impressions
from rmbert.run import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=73000, help="planted users (one dev impression each)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench")
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    t0 = time.time()
    data = planted(a.out, a.users)
    t_data = time.time() - t0
    small = planted(a.out, 300)
    run = load_run(quick_run(small, a.out / "eval-run"))
    t0 = time.time()
    split = load_split(data / "dev")
    t_load = time.time() - t0
    t0 = time.time()
    store = run.store([split], progress=False)
    t_encode = time.time() - t0
    batcher = run.batcher(split, store)
    t0 = time.time()
    scores = score_impressions(run.model, batcher, a.batch_size)
    t_eval = time.time() - t0
    m = evaluate_scores(batcher, scores)
    n = len(split.impressions)
    print(
        json.dumps(
            {
                "impressions": n,
                "candidate_rows": int(len(split.impressions.cand)),
                "news": len(split.news),
                "planting_s": round(t_data, 1),
                "load_split_s": round(t_load, 1),
                "encode_store_s": round(t_encode, 1),
                "evaluate_s": round(t_eval, 1),
                "impressions_per_s": round(n / t_eval, 1),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "auc_untrained_run": round(m["auc"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
