"""`rmbert demo`: planted data -> RMBERT on the embedded encoder (frozen) -> dev metrics table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rmbert.config import RunConfig
from rmbert.data.mind import load_split
from rmbert.data.synth import SynthConfig, synth
from rmbert.evaluate import cosine_baseline_scores, evaluate_scores, score_impressions
from rmbert.metrics import METRIC_KEYS
from rmbert.run import load_run
from rmbert.train import train


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'':34s}" + "".join(f"{k:>10s}" for k in METRIC_KEYS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:34s}" + "".join(f"{m[k]:10.4f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def demo(out: Path, users: int = 2000, epochs: int = 3, progress: bool = True, seed: int = 0) -> dict:
    t0 = time.time()
    data = out / "data"
    if not (data / "oracle.json").is_file():
        print(f"[1/3] planting MIND-format data for {users} users in {data}")
        synth(data, SynthConfig(users=users, seed=seed))
    else:
        print(f"[1/3] reusing planted data in {data}")
    oracle = json.loads((data / "oracle.json").read_text())["oracle"]["dev"]

    run_dir = out / "run"
    metrics_file = run_dir / "metrics.json"
    finished = metrics_file.is_file() and json.loads(metrics_file.read_text()).get("finished")
    if finished:
        print(f"[2/3] reusing the trained run in {run_dir}")
    else:
        print(f"[2/3] training RMBERT (frozen embedded MiniLM encoder, p=4) into {run_dir}")
        cfg = RunConfig()
        cfg = cfg.override({"train.epochs": epochs, "train.seed": seed})
        train(cfg, data / "train", run_dir, resume=(run_dir / "config.json").is_file(), progress=progress)

    print("[3/3] evaluating on the dev split (later in time, partly unseen news)")
    run = load_run(run_dir)
    dev = load_split(data / "dev")
    store = run.store([dev], progress=progress)
    batcher = run.batcher(dev, store)
    rows = {
        "oracle (true click probabilities)": oracle,
        "RMBERT (trained)": evaluate_scores(
            batcher, score_impressions(run.model, batcher, 64, progress=progress)
        ),
        "max cosine to history (no training)": evaluate_scores(
            batcher, cosine_baseline_scores(store, batcher)
        ),
    }
    print()
    print(format_table(rows))
    share = rows["RMBERT (trained)"]["auc"] / oracle["auc"]
    print(
        f"\nRMBERT reaches {share:.1%} of the oracle AUC on {rows['RMBERT (trained)']['impressions']} dev impressions;"
        f" total {time.time() - t0:.0f} s. Run folder: {run_dir}"
    )
    result = {"rows": rows, "auc_share_of_oracle": share, "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
