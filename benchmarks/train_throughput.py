"""Training samples/s by encoder mode, with and without in-batch dedup, on a planted split.

p=4, M=50, L=30, D=384 (the embedded MiniLM). Prints one JSON object (last line); the key
`frozen_samples_per_s` is the frozen-mode rate. Trainable modes run fewer steps (they are slow
on a CPU). Usage: python benchmarks/train_throughput.py [--users N] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import planted

from rmbert.config import RunConfig
from rmbert.data.batching import ImpressionBatcher
from rmbert.data.mind import load_split
from rmbert.train import train


def unique_ratio(data: Path, batch_size: int, batches: int = 20) -> float:
    """Unique news / news occurrences (history + candidates) per training batch."""
    split = load_split(data / "train")
    b = ImpressionBatcher(split.impressions, np.arange(len(split.news)) + 1, 50, {})
    plan = b.epoch_plan(0, 0, 0)
    uniq = total = 0
    for s in range(batches):
        batch = b.batch(plan[s * batch_size : (s + 1) * batch_size])
        rows = torch.cat([batch.hist[batch.hist_mask], batch.cand[batch.cand_mask]])
        uniq += len(torch.unique(rows))
        total += len(rows)
    return uniq / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40, help="steps for frozen mode")
    ap.add_argument("--trainable-steps", type=int, default=3, help="steps for top-k and full modes")
    ap.add_argument("--modes", default="frozen,top-k:1,top-k:2,full")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench")
    a = ap.parse_args()
    data = planted(a.out, a.users)
    base = RunConfig()
    out: dict = {
        "users": a.users,
        "batch_impressions": base.train.batch_size,
        "threads": torch.get_num_threads(),
    }
    for spec in a.modes.split(","):
        mode, _, k = spec.partition(":")
        for dedup in [True] if mode == "frozen" else [True, False]:
            steps = a.steps if mode == "frozen" else a.trainable_steps
            cfg = dataclasses.replace(
                base,
                encoder=dataclasses.replace(base.encoder, mode=mode, top_k=int(k or 1), dedup=dedup),
                train=dataclasses.replace(base.train, max_steps=steps, checkpoint_every=0),
            )
            run = a.out / f"run-{spec.replace(':', '')}-{'dedup' if dedup else 'nodedup'}"
            if run.exists():
                shutil.rmtree(run)
            r = train(cfg, data / "train", run, data / "dev", progress=False)
            key = spec + ("" if mode == "frozen" else (" dedup" if dedup else " no dedup"))
            out[key] = {"samples_per_s": r["train_samples_per_s"], "steps": r["steps"]}
    out["frozen_samples_per_s"] = out["frozen"]["samples_per_s"]
    out["unique_over_total_news_per_batch"] = round(unique_ratio(data, base.train.batch_size), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
