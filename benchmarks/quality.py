"""Does a trained model learn what the data holds? Planted generators x scales x seeds x rows.

Each generator (`rmbert.data.generators`, written blind to the models) plants a different click
mechanism; each is generated at about 2k, 20k and 100k training impressions. Rows:

    oracle          ranking by the true click probabilities (the ceiling)
    category-ctr    the candidate's category click-through rate in the training split
    max-cosine      max cosine of the candidate's frozen mean-pooled MiniLM vector to the history's
    logreg          logistic regression on simple features (cosines, category/subcategory CTR and
                    overlap with the history, shared entities), fitted on the training split
    nrms            NRMS over the same news side as the default RMBERT
    rmbert-paper    the paper's exact model and objective (`--preset paper`)
    rmbert-default  `rmbert train` as shipped (`--preset default`)

Trained rows choose nothing on the dev split: validation is a random 10% of the training
impressions (early stopping on its AUC); dev is later in time. Results are cached per cell in
OUT/results, so the script resumes. `--variant NAME=MODEL:PRESET:key=v,key=v` adds a trained row
(how every configuration in docs/results/quality.md was tried). Prints one JSON object (last line).

    python benchmarks/quality.py --out quality-out --generators story,entity --scales 2k,20k --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from rmbert.config import apply_overrides, preset
from rmbert.data.generators import GENERATORS, users_for
from rmbert.data.mind import Split, load_split
from rmbert.evaluate import cosine_baseline_scores, evaluate_scores, score_impressions
from rmbert.metrics import mind_metrics

SCALES = {"2k": 2_000, "20k": 20_000, "100k": 100_000}
EPOCHS = {"2k": 8, "20k": 4, "100k": 3}  # with early stopping on validation AUC (patience 2)
BASE_ROWS = ["oracle", "category-ctr", "max-cosine", "logreg"]
TRAINED = {
    "nrms": ("nrms", "default", []),
    "rmbert-paper": ("rmbert", "paper", []),
    "rmbert-default": ("rmbert", "default", []),
}
ALL_ROWS = BASE_ROWS + list(TRAINED)


def dataset(root: Path, gen: str, scale: str, seed: int) -> Path:
    d = root / "data" / f"{gen}-{scale}-s{seed}"
    if not (d / "oracle.json").is_file():
        GENERATORS[gen](d, users_for(gen, SCALES[scale]), seed)
    return d


# -- no-training rows ----------------------------------------------------------------------------
def _rates(keys: np.ndarray, labels: np.ndarray, n: int, prior: float, strength: float = 20.0):
    """Smoothed click-through rate per key value (unseen values get the prior)."""
    clicks = np.bincount(keys, weights=labels, minlength=n)
    shown = np.bincount(keys, minlength=n)
    return (clicks + strength * prior) / (shown + strength)


class Frozen:
    """The frozen embedded encoder's mean-pooled news vectors of a dataset (train + dev news)."""

    def __init__(self, data: Path) -> None:
        from rmbert.assemble import load_encoder, store_for

        cfg = preset("default")
        from rmbert.encoders.store import Encoding

        self.encoding = Encoding.of(*load_encoder(cfg))
        self.train, self.dev = load_split(data / "train"), load_split(data / "dev")
        self.store = store_for(cfg, self.encoding, [self.train, self.dev], progress=False)
        vec = np.asarray(self.store.pooled(), dtype=np.float32)
        self.unit = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)

    def batcher(self, split: Split):
        from rmbert.data.batching import ImpressionBatcher

        return ImpressionBatcher(split.impressions, self.store.rows(split.news.ids), 50, {})


def category_ctr(f: Frozen) -> np.ndarray:
    tr, dv = f.train, f.dev
    cats = sorted(set(tr.news.category) | set(dv.news.category))
    cid = {c: i for i, c in enumerate(cats)}
    tc = np.array([cid[c] for c in tr.news.category])[np.maximum(tr.impressions.cand, 0)]
    lab = np.maximum(tr.impressions.labels, 0).astype(np.float64)
    rate = _rates(tc, lab, len(cats), lab.mean())
    return rate[np.array([cid[c] for c in dv.news.category])[np.maximum(dv.impressions.cand, 0)]]


def simple_features(f: Frozen, split: Split, rates: dict) -> np.ndarray:
    """Per candidate row: max and mean cosine to the history, category and subcategory CTR,
    share of the history in the candidate's category / subcategory, share sharing an entity,
    history length (log)."""
    imps, news = split.impressions, split.news
    b = f.batcher(split)
    cat = np.array([rates["cid"].get(c, -1) for c in news.category])
    sub = np.array([rates["sid"].get(s, -1) for s in news.subcategory])
    ents = [set(news.entities(i)) for i in range(len(news))]
    out = np.zeros((len(imps.cand), 8), np.float32)
    for i in range(len(imps)):
        s, e = imps.cand_ptr[i], imps.cand_ptr[i + 1]
        c_news = np.maximum(imps.cand[s:e], 0)
        h_news = imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]][-50:]
        out[s:e, 2] = np.where(cat[c_news] >= 0, rates["cat"][np.maximum(cat[c_news], 0)], rates["prior"])
        out[s:e, 3] = np.where(sub[c_news] >= 0, rates["sub"][np.maximum(sub[c_news], 0)], rates["prior"])
        if len(h_news) == 0:
            continue
        sims = f.unit[b.cand_rows[s:e]] @ f.unit[b.hist_rows[imps.hist_ptr[i] : imps.hist_ptr[i + 1]][-50:]].T
        out[s:e, 0], out[s:e, 1] = sims.max(1), sims.mean(1)
        out[s:e, 4] = (cat[c_news][:, None] == cat[h_news][None, :]).mean(1)
        out[s:e, 5] = (sub[c_news][:, None] == sub[h_news][None, :]).mean(1)
        out[s:e, 6] = [np.mean([bool(ents[c] & ents[h]) for h in h_news]) if ents[c] else 0.0 for c in c_news]
        out[s:e, 7] = np.log1p(len(h_news))
    return out


def logreg(f: Frozen) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr = f.train
    lab = np.maximum(tr.impressions.labels, 0)
    rates: dict = {"prior": float(lab.mean())}
    for key, col in (("cat", tr.news.category), ("sub", tr.news.subcategory)):
        values = sorted(set(col))
        idx = {v: i for i, v in enumerate(values)}
        rates["cid" if key == "cat" else "sid"] = idx
        keys = np.array([idx[v] for v in col])[np.maximum(tr.impressions.cand, 0)]
        rates[key] = _rates(keys, lab.astype(np.float64), len(values), rates["prior"])
    x_tr, x_dv = simple_features(f, tr, rates), simple_features(f, f.dev, rates)
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), lab)
    return clf.decision_function(scaler.transform(x_dv))


# -- trained rows --------------------------------------------------------------------------------
def trained_row(
    data: Path, run_dir: Path, model: str, preset_name: str, overrides: list[str], epochs: int, seed: int
):
    from rmbert.run import load_run
    from rmbert.train import train

    cfg = dataclasses.replace(preset(preset_name), model=model)
    cfg = apply_overrides(cfg, [f"train.epochs={epochs}", f"train.seed={seed}", *overrides])
    resume = (run_dir / "config.json").is_file()
    t = train(cfg, data / "train", run_dir, resume=resume, progress=False)
    run = load_run(run_dir)
    dev = load_split(data / "dev")
    batcher = run.batcher(dev, run.store([dev], progress=False))
    m = evaluate_scores(batcher, score_impressions(run.model, batcher, 64))
    return m, {"valid_auc": t["valid"].get("auc"), "best_epoch": t["best_epoch"], "train_time_s": t["time_s"]}


def parse_variant(text: str) -> tuple[str, tuple[str, str, list[str]]]:
    name, spec = text.split("=", 1)
    model, preset_name, *rest = spec.split(":")
    overrides = [o for o in (rest[0].split(",") if rest else []) if o]
    return name.strip(), (model, preset_name, overrides)


def run_cell(out: Path, gen: str, scale: str, seed: int, row: str, specs: dict) -> dict:
    path = out / "results" / gen / scale / f"seed{seed}" / f"{row}.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = dataset(out, gen, scale, seed)
    t0 = time.time()
    extra: dict = {}
    if row == "oracle":
        m = json.loads((data / "oracle.json").read_text())["oracle"]["dev"]
    elif row in ("category-ctr", "max-cosine", "logreg"):
        f = Frozen(data)
        imps = f.dev.impressions
        if row == "category-ctr":
            scores = category_ctr(f)
        elif row == "max-cosine":
            scores = cosine_baseline_scores(f.store, f.batcher(f.dev))
        else:
            scores = logreg(f)
        m = mind_metrics(imps.labels, scores, imps.cand_ptr)
    else:
        model, preset_name, overrides = specs[row]
        run_dir = out / "runs" / gen / scale / f"seed{seed}" / row
        m, extra = trained_row(data, run_dir, model, preset_name, overrides, EPOCHS[scale], seed)
    oracle = json.loads((data / "oracle.json").read_text())
    result = {
        "generator": gen,
        "scale": scale,
        "seed": seed,
        "row": row,
        "train_impressions": oracle.get("train_impressions") or len(load_split(data / "train").impressions),
        **{k: float(m[k]) for k in ("auc", "mrr", "ndcg@5", "ndcg@10")},
        **extra,
        "seconds": round(time.time() - t0, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["generator"], r["scale"], r["row"]), []).append(r)
    out = []
    for (gen, scale, row), rs in groups.items():
        auc = np.array([r["auc"] for r in rs])
        out.append(
            {
                "generator": gen,
                "scale": scale,
                "row": row,
                "seeds": len(rs),
                "train_impressions": int(np.mean([r["train_impressions"] for r in rs])),
                "auc": round(float(auc.mean()), 4),
                "auc_std": round(float(auc.std(ddof=1)) if len(rs) > 1 else 0.0, 4),
                **{k: round(float(np.mean([r[k] for r in rs])), 4) for k in ("mrr", "ndcg@5", "ndcg@10")},
            }
        )
    return out


ROW_NAMES = {
    "oracle": "oracle (true click probabilities)",
    "category-ctr": "category CTR (no training)",
    "max-cosine": "max-cosine (no training)",
    "logreg": "logistic regression, simple features",
    "nrms": "NRMS",
    "rmbert-paper": "RMBERT, paper preset",
    "rmbert-default": "RMBERT, default",
}


def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*/*/seed*/*.json"))]


SUMMARY_FIELDS = (
    "generator",
    "scale",
    "row",
    "seeds",
    "train_impressions",
    "auc",
    "auc_std",
    "mrr",
    "ndcg@5",
    "ndcg@10",
)


def read_summary(path: Path) -> list[dict]:
    """A summary CSV (`--summary`): one cell per line; empty metrics stay None."""
    import csv

    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            cell: dict = {k: rec[k] for k in ("generator", "scale", "row")}
            cell["seeds"], cell["train_impressions"] = int(rec["seeds"]), int(rec["train_impressions"])
            for k in ("auc", "auc_std", "mrr", "ndcg@5", "ndcg@10"):
                cell[k] = float(rec[k]) if rec[k] else None
            out.append(cell)
    return out


def write_summary(path: Path, summary: list[dict]) -> None:
    import csv

    order = {r: i for i, r in enumerate(ALL_ROWS)}
    cells = sorted(
        summary, key=lambda c: (c["generator"], SCALES[c["scale"]], order.get(c["row"], 99), c["row"])
    )
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if c.get(k) is None else c[k]) for k in SUMMARY_FIELDS} for c in cells)


def plot_curves(summary: list[dict], rows: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    gens = sorted({s["generator"] for s in summary})
    fig, axes = plt.subplots(1, len(gens), figsize=(4.2 * len(gens), 3.8), squeeze=False)
    for ax, gen in zip(axes[0], gens):
        for row in rows:
            pts = sorted(
                (s["train_impressions"], s["auc"], s["auc_std"])
                for s in summary
                if s["generator"] == gen and s["row"] == row
            )
            if len(pts) < 1:
                continue
            x, y, e = zip(*pts)
            style = {"oracle": "k--", "max-cosine": "C7:", "category-ctr": "C7-."}.get(row, "-")
            ax.errorbar(x, y, yerr=e, fmt=style, marker="o", ms=3, capsize=2, label=ROW_NAMES.get(row, row))
        ax.set_xscale("log")
        ax.set_xticks(list(SCALES.values()), list(SCALES))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(1_500, 150_000)
        ax.set(title=gen, xlabel="training impressions", ylabel="dev AUC")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_tables(summary: list[dict], rows: list[str]) -> str:
    """Markdown: one table per scale, generators as columns, AUC mean +- std (% of oracle)."""
    by = {(s["generator"], s["scale"], s["row"]): s for s in summary}
    gens = sorted({s["generator"] for s in summary})
    lines = []
    for scale in [sc for sc in SCALES if any(s["scale"] == sc for s in summary)]:
        n = {g: by.get((g, scale, "oracle"), {}).get("train_impressions") for g in gens}
        lines += [f"### {scale} training impressions", ""]
        lines.append("| row | " + " | ".join(f"{g} ({n[g]:,})" if n[g] else g for g in gens) + " |")
        lines.append("|---|" + "---|" * len(gens))
        for row in rows:
            cells = []
            for g in gens:
                s, o = by.get((g, scale, row)), by.get((g, scale, "oracle"))
                if s is None:
                    cells.append("")
                    continue
                share = f" ({s['auc'] / o['auc']:.0%})" if o and row != "oracle" else ""
                sd = f" ± {s['auc_std']:.3f}" if s["seeds"] > 1 else ""
                cells.append(f"{s['auc']:.4f}{sd}{share}")
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        seeds = sorted({s["seeds"] for s in summary if s["scale"] == scale})
        lines += [
            "",
            f"Seeds per cell: {', '.join(map(str, seeds))}; AUC mean ± standard deviation over seeds.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("quality-out"))
    p.add_argument("--generators", default=",".join(g for g in GENERATORS))
    p.add_argument("--scales", default="2k,20k")
    p.add_argument("--seeds", type=int, default=3, help="seeds at 2k and 20k (100k runs seed 0 only)")
    p.add_argument("--first-seed", type=int, default=0, help="start at this seed (add seeds to a run)")
    p.add_argument("--rows", default=",".join(ALL_ROWS))
    p.add_argument("--variant", action="append", default=[], help="NAME=MODEL:PRESET:key=v,key=v")
    p.add_argument(
        "--plot", type=Path, default=None, help="write the learning-curve PNG of all cached results"
    )
    p.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="with --plot: a summary CSV of earlier cells, kept up to date (the cached cells replace theirs)",
    )
    a = p.parse_args()
    if a.plot:
        everything = collect(a.out)
        summary = summarize([r for r in everything if r["row"] in ALL_ROWS])
        if a.summary:
            fresh = {(c["generator"], c["scale"], c["row"]) for c in summary}
            kept = [c for c in read_summary(a.summary) if (c["generator"], c["scale"], c["row"]) not in fresh]
            summary = kept + summary
            write_summary(a.summary, summary)
        plot_curves(summary, ALL_ROWS, a.plot)
        print(report_tables(summary, ALL_ROWS))
        tried = sorted({r["row"] for r in everything} - set(ALL_ROWS))
        print("\n## Every configuration tried (seed 0: screening variants ran one seed)\n")
        print(report_tables(summarize([r for r in everything if r["seed"] == 0]), [*ALL_ROWS, *tried]))
        return
    os.environ.setdefault("RMBERT_CACHE", str(a.out / "cache"))
    specs = dict(TRAINED)
    specs.update(parse_variant(v) for v in a.variant)
    rows = [r for r in a.rows.split(",") if r] + [parse_variant(v)[0] for v in a.variant]
    results = []
    for gen in a.generators.split(","):
        for scale in a.scales.split(","):
            for seed in range(a.first_seed, a.seeds if scale != "100k" else 1):
                for row in rows:
                    r = run_cell(a.out, gen, scale, seed, row, specs)
                    results.append(r)
                    print(
                        f"{gen:>8s} {scale:>4s} seed {seed} {row:>16s}: auc {r['auc']:.4f} ({r['seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    print(json.dumps({"summary": summarize(results)}))


if __name__ == "__main__":
    main()
