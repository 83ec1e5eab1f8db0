"""Helpers shared by the benchmark scripts (planted data, a quick run, peak memory)."""

from __future__ import annotations

import resource
from pathlib import Path

from rmbert.config import RunConfig
from rmbert.data.synth import SynthConfig, synth
from rmbert.train import train


def planted(root: Path, users: int, seed: int = 0) -> Path:
    data = root / f"planted-{users}-{seed}"
    if not (data / "oracle.json").is_file():
        synth(data, SynthConfig(users=users, seed=seed))
    return data


def quick_run(data: Path, out: Path, steps: int = 20, **train_kw) -> Path:
    """A run folder trained for a few steps (speed does not depend on how well it is trained)."""
    if (out / "model.safetensors").is_file():
        return out
    cfg = RunConfig()
    cfg = cfg.override({"train.max_steps": steps} | {f"train.{k}": v for k, v in train_kw.items()})
    train(cfg, data / "train", out, data / "dev", progress=False)
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
