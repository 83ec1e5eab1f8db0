"""Memory plan for MIND-large: measured bytes per news (store) and per impression (data layer),
peak RSS of frozen-mode training at a large planted size, and the extrapolation to MIND-large.

Prints one JSON object (last line). MIND-large sizes: 161,013 news, 2,232,748 training
impressions, about 83M candidate rows; the history length (about 33 on average) is an assumption
stated in the output. Usage: python benchmarks/memory_plan.py [--users 73000] [--steps 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from _common import peak_rss_gib, planted

from rmbert.config import RunConfig
from rmbert.data.mind import load_split
from rmbert.train import train

LARGE = {"news": 161_013, "train_impressions": 2_232_748, "candidate_rows": 83_000_000, "history_mean": 33}


def store_bytes_per_news(D: int, L: int = 30) -> int:
    S = L + 2
    return 2 * D + 2 * L * D + L + 4 * S + S  # cls + tokens (fp16), mask, input_ids (int32), attn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=73000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench")
    a = ap.parse_args()
    data = planted(a.out, a.users)
    split = load_split(data / "train")
    imps = split.impressions
    arrays = [
        imps.imp_ids,
        imps.user_idx,
        imps.times,
        imps.hist_ptr,
        imps.hist,
        imps.cand_ptr,
        imps.cand,
        imps.labels,
    ]
    per_imp_fixed = 8 + 4 + 8 + 8 + 8  # id, user, time, two CSR offsets
    measured = sum(x.nbytes for x in arrays) / len(imps)
    hist_mean = len(imps.hist) / len(imps)
    cand_mean = len(imps.cand) / len(imps)
    cfg = RunConfig()
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=a.steps, checkpoint_every=0)
    )
    run = a.out / "memory-run"
    if run.exists():
        shutil.rmtree(run)
    r = train(cfg, data / "train", run, data / "dev", progress=False)
    large_data_gib = (
        LARGE["train_impressions"] * (per_imp_fixed + 4 * LARGE["history_mean"]) + LARGE["candidate_rows"] * 5
    ) / 2**30
    out = {
        "planted": {
            "users": a.users,
            "news": len(split.news),
            "train_impressions": len(imps),
            "history_mean": round(hist_mean, 1),
            "candidates_mean": round(cand_mean, 1),
        },
        "bytes_per_impression_measured": round(measured, 1),
        "bytes_per_impression_formula": "36 + 4 * history + 5 * candidates",
        "store_bytes_per_news": {"d384": store_bytes_per_news(384), "d768": store_bytes_per_news(768)},
        "frozen_train_samples_per_s": r["train_samples_per_s"],
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "mind_large_extrapolated": {
            "assumptions": LARGE,
            "data_layer_gib": round(large_data_gib, 2),
            "store_gib_d384": round(LARGE["news"] * store_bytes_per_news(384) / 2**30, 2),
            "store_gib_d768": round(LARGE["news"] * store_bytes_per_news(768) / 2**30, 2),
            "note": "the store is memory-mapped: resident only as far as pages are touched",
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
