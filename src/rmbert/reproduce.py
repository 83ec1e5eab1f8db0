"""`rmbert reproduce table1|figure2`: the paper's grids, several seeds, resumable, with plots.

Each (row, seed) trains into OUT/runs/<row>/seed<k> and is evaluated on the test split into
result.json; a finished pair is skipped on the next call, an interrupted one resumes. After
every run the tables (results.csv, <grid>.md) and figures are rewritten from all result.json.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rmbert.config import RunConfig, apply_overrides, preset
from rmbert.data.mind import load_split
from rmbert.evaluate import evaluate_scores, score_impressions
from rmbert.metrics import METRIC_KEYS
from rmbert.run import load_run
from rmbert.train import train

# The paper's Table 1 (AUC, MRR, nDCG@5) on MIND-small and MIND-large.
PAPER_TABLE1 = {
    "DeepFM": ((0.5752, 0.2391, 0.2489), (0.6152, 0.2759, 0.2934)),
    "DCN": ((0.5801, 0.2393, 0.2519), (0.6124, 0.2679, 0.2857)),
    "DKN": ((0.6290, 0.2837, 0.3099), (0.6715, 0.3206, 0.3531)),
    "NRMS": ((0.6563, 0.3096, 0.3413), (0.6785, 0.3297, 0.3632)),
    "LSTUR": ((0.6587, 0.3078, 0.3395), (0.6801, 0.3290, 0.3629)),
    "NPA": ((0.6465, 0.3001, 0.3314), (0.6752, 0.3261, 0.3581)),
    "FIM": ((0.6531, 0.3123, 0.3400), (0.6852, 0.3344, 0.3704)),
    "RMBERT": ((0.6746, 0.3249, 0.3614), (0.6956, 0.3410, 0.3775)),
}


@dataclass(frozen=True)
class Row:
    name: str
    model: str = "rmbert"
    mode: str | None = None  # None: the grid's --encoder-mode
    overrides: tuple[str, ...] = ()
    paper: str | None = None  # the paper's row it corresponds to
    preset: str = "paper"  # the paper's rows run the paper's exact model and objective

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


GRIDS: dict[str, list[Row]] = {
    "table1": [
        Row("RMBERT", paper="RMBERT"),
        Row("RMBERT (default)", preset="default"),
        Row("NRMS", "nrms", paper="NRMS"),
        Row("LSTUR", "lstur", paper="LSTUR"),
        Row("NPA", "npa", paper="NPA"),
        Row("NRMS (word encoder)", "nrms", "words", paper="NRMS"),
        Row("LSTUR (word encoder)", "lstur", "words", paper="LSTUR"),
        Row("NPA (word encoder)", "npa", "words", paper="NPA"),
        # the RMBERT paper's other baselines, each with its own word-level news encoder (or, for
        # the CTR models, ID and TF-IDF features over the same WordPiece tokens)
        Row("DeepFM", "deepfm", "words", paper="DeepFM"),
        Row("DCN", "dcn", "words", paper="DCN"),
        Row("DKN", "dkn", "words", paper="DKN"),
        # FIM's 3D matching volume grows with every candidate of an impression: it trains, as in
        # its paper, on each click with 4 sampled negatives
        Row("FIM", "fim", "words", ("train.negatives=4", "train.loss=softmax"), paper="FIM"),
        Row("NAML", "naml", "words"),
    ],
    "figure2": [
        Row("RMBERT"),
        Row("w/o PQ", overrides=("rmbert.prev_query=false",)),
        Row("w/o PM", overrides=("rmbert.prev_memory=false",)),
        Row("w/o Att", overrides=("rmbert.attention=false",)),
        Row("w/o BERT", mode="lstm"),
        Row("sigmoid query attention", overrides=("rmbert.query_attention=sigmoid",)),
        *[Row(f"p={p}", overrides=(f"rmbert.steps={p}",)) for p in (1, 2, 3, 5, 6)],
    ],
}
ABLATIONS = ["RMBERT", "w/o PQ", "w/o PM", "w/o Att", "w/o BERT"]


def run_config(overrides: list[str], row: Row, seed: int) -> RunConfig:
    """The row's preset, then the grid's overrides (encoder, budget, --set), then the row's own."""
    cfg = apply_overrides(preset(row.preset), overrides)
    cfg = cfg.override(
        {"model": row.model, "train.seed": seed} | ({"encoder.mode": row.mode} if row.mode else {})
    )
    return apply_overrides(cfg, list(row.overrides))


def run_grid(
    grid: str,
    train_dir: Path,
    test_dir: Path,
    out: Path,
    overrides: list[str],
    seeds: int = 3,
    rows: list[str] | None = None,
    valid_dir: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    chosen = [r for r in GRIDS[grid] if rows is None or r.name in rows or r.slug in rows]
    if rows and len(chosen) != len(rows):
        known = ", ".join(r.slug for r in GRIDS[grid])
        raise ValueError(f"unknown row(s) in {rows}; rows of {grid}: {known}")
    out.mkdir(parents=True, exist_ok=True)
    test = load_split(test_dir)
    jobs = [(r, s) for r in chosen for s in range(seeds)]
    bar = tqdm(jobs, desc=f"reproduce {grid}", unit="run", disable=not progress)
    for row, seed in bar:
        run_dir = out / "runs" / row.slug / f"seed{seed}"
        result_file = run_dir / "result.json"
        bar.set_postfix_str(f"{row.name} seed {seed}")
        if result_file.is_file():
            continue
        cfg = run_config(overrides, row, seed)
        resume = (run_dir / "config.json").is_file()
        t = train(cfg, train_dir, run_dir, valid_dir, resume=resume, progress=False)
        loaded = load_run(run_dir)
        batcher = loaded.batcher(test, loaded.store([test], progress=False))
        m = evaluate_scores(batcher, score_impressions(loaded.model, batcher, cfg.train.eval_batch_size))
        result = {
            "row": row.name,
            "seed": seed,
            **{k: m[k] for k in METRIC_KEYS},
            "impressions": m["impressions"],
            "valid_auc": t["valid"].get("auc"),
            "train_time_s": t["time_s"],
            "steps": t["steps"],
            "best_epoch": t["best_epoch"],
            "epochs_run": t["epochs_run"],
            "samples_per_s": t["train_samples_per_s"],
        }
        result_file.write_text(json.dumps(result, indent=2))
        tqdm.write(
            f"{row.name} seed {seed}: auc {m['auc']:.4f} mrr {m['mrr']:.4f} ndcg@5 {m['ndcg@5']:.4f}",
            file=sys.stderr,
        )
        write_outputs(grid, out, chosen)
    return write_outputs(grid, out, chosen)


def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/seed*/result.json"))]


def summarize(results: list[dict], rows: list[Row]) -> list[dict]:
    """Mean and standard deviation over seeds, per row, in grid order."""
    out = []
    for row in rows:
        rs = [r for r in results if r["row"] == row.name]
        if not rs:
            continue
        s = {"row": row.name, "seeds": len(rs), "paper": row.paper}
        for k in METRIC_KEYS:
            v = np.array([r[k] for r in rs])
            s[k], s[k + "_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        if all("best_epoch" in r for r in rs):  # the budget: where validation peaked, per seed
            s["best_epochs"] = [r["best_epoch"] for r in rs]
            s["epochs_run"] = [r["epochs_run"] for r in rs]
            # validation stopped rising: in every seed a later epoch ran without beating the best
            s["peaked"] = all(0 < r["best_epoch"] < r["epochs_run"] for r in rs)
            s["samples_per_s"] = float(np.mean([r["samples_per_s"] for r in rs]))
        out.append(s)
    return out


def write_outputs(grid: str, out: Path, rows: list[Row]) -> list[dict]:
    results = collect(out)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=["row", "seed", *METRIC_KEYS, "impressions", "valid_auc", "train_time_s", "steps"]
            + ["best_epoch", "epochs_run", "samples_per_s"],
            restval="",
        )
        w.writeheader()
        for r in results:
            w.writerow(r)
    summary = summarize(results, rows)
    (out / f"{grid}.md").write_text(markdown(grid, summary))
    if grid == "figure2" and summary:
        plot_figure2(summary, out)
    return summary


def markdown(grid: str, summary: list[dict]) -> str:
    head = "| Method | seeds | AUC | MRR | nDCG@5 | nDCG@10 |"
    budget = any("best_epochs" in s for s in summary)
    if budget:
        head += " best epoch / run, per seed | validation peaked | training samples/s |"
    if grid == "table1":
        head += " paper AUC (MIND-small) | paper MRR | paper nDCG@5 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        cells = [s["row"], str(s["seeds"])] + [
            f"{s[k]:.4f} ± {s[k + '_std']:.4f}" if s["seeds"] > 1 else f"{s[k]:.4f}"  # 1 seed: no spread
            for k in METRIC_KEYS
        ]
        if budget and "best_epochs" in s:
            runs = ", ".join(f"{b}/{e}" for b, e in zip(s["best_epochs"], s["epochs_run"]))
            cells += [runs, "yes" if s["peaked"] else "**no: still rising**", f"{s['samples_per_s']:,.0f}"]
        elif budget:
            cells += ["", "", ""]
        if grid == "table1":
            p = PAPER_TABLE1.get(s["paper"] or "", ((None, None, None),))[0]
            cells += [f"{v:.4f}" if v is not None else "" for v in p]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nMean ± standard deviation over seeds (a single seed's row has no spread); our numbers are on the --test split given to `rmbert reproduce`."
    if budget:
        note += (
            " Budget: each run trains until validation AUC has not risen for train.patience epochs"
            " (or train.epochs); its weights are those of the best epoch. A row whose best epoch was"
            " its last is marked still rising: a larger --epochs would be its fair budget."
        )
    if grid == "table1":
        note += " The paper's columns are its MIND-small Table 1 (comparable only when the test split is MIND-small dev)."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_figure2(summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {s["row"]: s for s in summary}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in ABLATIONS if n in by]
    if names:
        x = np.arange(len(names))
        for j, (k, color) in enumerate([("auc", "tab:blue"), ("mrr", "tab:orange"), ("ndcg@5", "tab:green")]):
            a.bar(
                x + (j - 1) * 0.27,
                [by[n][k] for n in names],
                0.27,
                yerr=[by[n][k + "_std"] for n in names],
                capsize=3,
                label=k.upper() if k != "ndcg@5" else "nDCG@5",
                color=color,
            )
        a.set_xticks(x, names)
        lo = min(by[n][k] for n in names for k in ("auc", "mrr", "ndcg@5"))
        a.set_ylim(max(0.0, lo - 0.05), None)
        a.set(title="(a) Effectiveness of each module", ylabel="score")
        a.legend(fontsize=8)
    steps = {1: "p=1", 2: "p=2", 3: "p=3", 4: "RMBERT", 5: "p=5", 6: "p=6"}
    ps = [p for p, n in steps.items() if n in by]
    if ps:
        b.errorbar(
            ps,
            [by[steps[p]]["auc"] for p in ps],
            yerr=[by[steps[p]]["auc_std"] for p in ps],
            marker="o",
            capsize=3,
        )
        b.set(
            title="(b) AUC against the number of RMCs",
            xlabel="number of reasoning memory cells p",
            ylabel="AUC",
        )
        b.set_xticks(ps)
        b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "figure2.png", dpi=120)
    plt.close(fig)
