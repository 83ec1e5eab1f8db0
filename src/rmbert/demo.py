"""`rmbert demo`: planted data -> RMBERT, the paper's model and the default, on the embedded
encoder (frozen) -> dev metrics beside the oracle and a no-training baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rmbert.config import apply_overrides, preset
from rmbert.data.generators import GENERATORS
from rmbert.data.mind import load_split
from rmbert.evaluate import cosine_baseline_scores, evaluate_scores, score_impressions
from rmbert.metrics import METRIC_KEYS
from rmbert.run import load_run
from rmbert.train import train

ROWS = {"paper": "RMBERT, paper preset (trained)", "default": "RMBERT, default (trained)"}


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'':38s}" + "".join(f"{k:>10s}" for k in METRIC_KEYS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:38s}" + "".join(f"{m[k]:10.4f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def train_preset(
    name: str, data: Path, run_dir: Path, epochs: int, seed: int, progress: bool, overrides: list[str]
) -> None:
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("finished"):
        print(f"      reusing the trained run in {run_dir}")
        return
    cfg = apply_overrides(preset(name).override({"train.epochs": epochs, "train.seed": seed}), overrides)
    train(cfg, data / "train", run_dir, resume=(run_dir / "config.json").is_file(), progress=progress)


def demo(
    out: Path,
    users: int = 2000,
    epochs: int = 3,
    progress: bool = True,
    seed: int = 0,
    generator: str = "drift",
    overrides: list[str] | None = None,
) -> dict:
    """Plant data, train both presets (with `overrides`, e.g. another encoder), print the table."""
    t0 = time.time()
    data = out / "data"
    if not (data / "oracle.json").is_file():
        print(f"[1/3] planting MIND-format data ({generator} generator, {users} users) in {data}")
        GENERATORS[generator](data, users, seed)
    else:
        print(f"[1/3] reusing planted data in {data}")
    oracle = json.loads((data / "oracle.json").read_text())["oracle"]["dev"]
    for k, (name, label) in enumerate(ROWS.items()):
        print(
            f"[2/3] ({k + 1}/2) training {label.split(' (')[0]} on the frozen embedded MiniLM into {out / name}"
        )
        train_preset(name, data, out / name, epochs, seed, progress, list(overrides or []))

    print("[3/3] evaluating on the dev split (later in time, partly unseen news)")
    dev = load_split(data / "dev")
    rows: dict[str, dict] = {"oracle (true click probabilities)": oracle}
    for name, label in ROWS.items():
        run = load_run(out / name)
        store = run.store([dev], progress=progress)
        batcher = run.batcher(dev, store)
        rows[label] = evaluate_scores(batcher, score_impressions(run.model, batcher, 64, progress=progress))
    rows["max cosine to history (no training)"] = evaluate_scores(
        batcher, cosine_baseline_scores(store, batcher)
    )
    print()
    print(format_table(rows))
    auc = {n: rows[label]["auc"] for n, label in ROWS.items()}
    cos = rows["max cosine to history (no training)"]["auc"]
    print(
        f"\nThe default reaches {auc['default'] / oracle['auc']:.1%} of the oracle AUC ({auc['default'] - cos:+.4f} over"
        f" max-cosine, {auc['default'] - auc['paper']:+.4f} over the paper's model) on"
        f" {rows[ROWS['default']]['impressions']} dev impressions; total {time.time() - t0:.0f} s."
        f" Run folders: {out / 'default'}, {out / 'paper'}"
    )
    result = {"rows": rows, "generator": generator, "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
