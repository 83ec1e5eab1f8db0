"""The one training loop (plain PyTorch; DistributedDataParallel under `torchrun`).

Pointwise BCE over every candidate of an impression (the paper), or over a click and K
sampled negatives; softmax over the group as an option. Validation each epoch with the
official metrics, early stopping on AUC, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from rmbert.assemble import NewsRecModel, assemble
from rmbert.config import RunConfig
from rmbert.data.batching import Batch, ImpressionBatcher
from rmbert.data.mind import Split, load_split
from rmbert.encoders.bert import load_tokenizer
from rmbert.evaluate import evaluate_scores, jsonable, score_impressions
from rmbert.models.base import NEG
from rmbert.run import load_weights, save_weights, weights

LOG_FIELDS = [
    "step",
    "epoch",
    "loss",
    "valid_auc",
    "valid_mrr",
    "valid_ndcg5",
    "valid_ndcg10",
    "samples_per_s",
    "time_s",
]


@dataclass
class Progress:
    """Everything that resume needs beyond the weights and optimizer."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_auc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    samples: int = 0
    train_time: float = 0.0
    log: list[dict] = field(default_factory=list)
    best_valid: dict = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(cfg: RunConfig, device: torch.device):
    amp = cfg.train.amp
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def batch_loss(logits: torch.Tensor, batch: Batch, cfg: RunConfig, denom: float) -> torch.Tensor:
    """Sum of the per-row losses divided by `denom` (the global row count, for exact DDP equivalence)."""
    logits = logits.float()
    if cfg.train.loss == "softmax":
        masked = logits.masked_fill(~batch.cand_mask, NEG)
        return (
            F.cross_entropy(
                masked, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction="sum"
            )
            / denom
        )
    per = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    return (per * batch.cand_mask).sum() / denom


def save_checkpoint(
    path: Path, model: NewsRecModel, opt: torch.optim.Optimizer, prog: Progress, cfg: RunConfig, scaler=None
) -> None:
    state = {
        "model": weights(model, cfg),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": asdict(prog),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """The resume state, read with `weights_only=True`: a checkpoint holds tensors and plain
    values only, so a crafted file cannot run code. Any problem names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or a pickle with code in it
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "progress", "rng"} <= set(state):
        raise ValueError(f"{path}: not an rmbert checkpoint (missing keys)")
    return state


def write_log(out: Path, rows: list[dict]) -> None:
    tmp = out / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in LOG_FIELDS})
    os.replace(tmp, out / "log.csv")


def plot_curves(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    tr = [r for r in rows if r.get("loss") not in (None, "")]
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="tab:blue")
    a.set(xlabel="step", ylabel="training loss", title="Loss")
    va = [r for r in rows if r.get("valid_auc") not in (None, "")]
    b.plot([r["epoch"] for r in va], [r["valid_auc"] for r in va], marker="o", color="tab:green")
    b.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def split_validation(split: Split, fraction: float, seed: int, by: str = "random") -> tuple[Split, Split]:
    """A `fraction` of the training impressions held out for validation: random ones (the paper's
    protocol), or by="time" the latest ones (ties in file order), so that validation, like MIND's
    dev split, asks about news published after most of the training clicks."""
    n = len(split.impressions)
    if by == "time":
        perm = np.argsort(-split.impressions.times, kind="stable")  # the latest first
    else:
        perm = np.random.default_rng([seed, 7919]).permutation(n)
    n_valid = max(1, int(round(n * fraction)))
    valid_rows, train_rows = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    imps = split.impressions
    return Split(split.path, split.news, imps.subset(train_rows)), Split(
        split.path, split.news, imps.subset(valid_rows)
    )


@dataclass
class Setup:
    """Everything the training phases share: config, data, model, optimiser and progress."""

    cfg: RunConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: NewsRecModel
    net: torch.nn.Module  # the model, wrapped in DDP under torchrun
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_b: ImpressionBatcher
    valid_b: ImpressionBatcher
    prog: Progress
    progress: bool
    t_start: float = 0.0
    board: object | None = None  # a TensorBoard SummaryWriter (train.tensorboard)

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint.pt"

    def out_of_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.prog.global_step >= self.cfg.train.max_steps

    def done(self) -> bool:
        p = self.prog
        return p.epoch >= self.cfg.train.epochs or p.stopped or self.out_of_steps()


def train(
    cfg: RunConfig,
    train_dir: str | Path,
    out: str | Path,
    valid_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    budget: dict[str, int] | None = None,
) -> dict:
    """Train into run folder `out`; returns the final metrics (also written to out/metrics.json).

    On `resume` everything comes from the saved config.json but the budget: `budget` (train
    fields such as epochs, max_steps; the command line passes what it was given), or by default
    cfg's epochs and max_steps."""
    setup = prepare(cfg, Path(train_dir), Path(out), valid_dir, resume, progress, budget)
    while not setup.done():
        if not run_epoch(setup):  # stopped by max_steps mid-epoch: resumable from there
            break
        end_epoch(setup)
    return finish(setup)


# -- phase 1: prepare -----------------------------------------------------------------------------
def resolve_run(cfg: RunConfig, out: Path, resume: bool, budget: dict | None) -> RunConfig:
    """The config to train: cfg, or on resume the saved one with the budget applied."""
    if resume:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no config.json)")
        saved = RunConfig.load(out / "config.json")
        if budget is None:
            budget = {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}
        return saved.override({f"train.{k}": v for k, v in budget.items()})
    if (out / "config.json").exists() or (out / "checkpoint.pt").exists():
        raise FileExistsError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    return cfg


def load_data(cfg: RunConfig, train_dir: Path, valid_dir) -> tuple[Split, Split]:
    train_split = load_split(train_dir)
    if not train_split.impressions.has_labels:
        raise ValueError(f"{train_dir}: the training split has no labels (a test split)")
    if valid_dir is not None:
        valid_split = load_split(valid_dir)
    elif len(train_split.impressions) < 2:
        raise ValueError(
            f"{train_dir}: {len(train_split.impressions)} impressions; too few to hold out validation"
        )
    else:
        train_split, valid_split = split_validation(
            train_split, cfg.train.valid_fraction, cfg.train.seed, cfg.train.valid_by
        )
    for name, sp in (("training", train_split), ("validation", valid_split)):
        if len(sp.impressions) == 0:
            raise ValueError(f"{sp.path}: the {name} split has no impressions")
    return train_split, valid_split


def make_optimizer(cfg: RunConfig, model: NewsRecModel) -> torch.optim.Optimizer:
    """Adam with the recommender at train.lr and a trainable encoder at train.encoder_lr."""
    groups = [{"params": [p for p in model.rec.parameters() if p.requires_grad], "base_lr": cfg.train.lr}]
    side = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("rec.")]
    enc = [p for p in side if any(p is q for q in model.news.parameters())]
    other = [p for p in side if not any(p is q for q in enc)]  # news features: the recommender's rate
    groups[0]["params"] += other
    if enc:
        groups.append({"params": enc, "base_lr": cfg.train.encoder_lr})
    for g in groups:
        g["lr"] = g["base_lr"]
    # the fused kernel: one pass over each parameter instead of ~10 (5x faster on the CPU here)
    return torch.optim.Adam(groups, weight_decay=cfg.train.weight_decay, fused=True)


def prepare(cfg, train_dir: Path, out: Path, valid_dir, resume: bool, progress: bool, budget) -> Setup:
    rank, world = distributed()
    cfg = resolve_run(cfg, out, resume, budget)
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    load_tokenizer(cfg.encoder.name)  # an encoder name that does not resolve fails before the data is read
    train_split, valid_split = load_data(cfg, train_dir, valid_dir)
    users = train_split.impressions.users
    user_index = {u: i + 1 for i, u in enumerate(users)}
    built = assemble(cfg, [train_split, valid_split], rank, world, progress, users, train_split.news)
    cfg, model, vocab = built.cfg, built.model.to(device), built.vocab
    batcher = partial(ImpressionBatcher, max_history=cfg.train.max_history, user_index=user_index)
    train_b = batcher(train_split.impressions, built.store.rows(train_split.news.ids))
    valid_b = batcher(valid_split.impressions, built.store.rows(valid_split.news.ids))
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.amp == "fp16")
    prog = Progress()
    if resume and (out / "checkpoint.pt").is_file():
        prog = restore(out / "checkpoint.pt", model, opt, scaler)
    if rank == 0:
        save_run_files(out, cfg, built.encoding.tokenizer, users, vocab)
        (out / "popularity.json").write_text(json.dumps(popularity(train_split)) + "\n")
    net: torch.nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    setup = Setup(cfg, out, rank, world, device, model, net, opt, scaler, train_b, valid_b, prog, progress)
    setup.t_start = time.time() - prog.train_time
    setup.board = tensorboard(out) if cfg.train.tensorboard and rank == 0 else None
    return setup


def restore(path: Path, model: NewsRecModel, opt: torch.optim.Optimizer, scaler) -> Progress:
    state = load_checkpoint(path)
    load_weights(model, state["model"])
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def popularity(split: Split) -> dict[str, int]:
    """Training clicks per news id (for novelty in `rmbert evaluate --beyond`)."""
    imps = split.impressions
    clicked = imps.cand[(imps.labels == 1) & (imps.cand >= 0)]
    counts = np.bincount(clicked, minlength=len(split.news))
    return {split.news.ids[i]: int(c) for i, c in enumerate(counts) if c}


def save_run_files(out: Path, cfg: RunConfig, tokenizer, users: list[str], vocab) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "users.txt").write_text("\n".join(users))
    if vocab is not None:
        vocab.save(out / "features.json")


def tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
        ) from None
    return SummaryWriter(str(out / "tensorboard"))


# -- phase 2: one epoch ---------------------------------------------------------------------------
def run_epoch(s: Setup) -> bool:
    """Train the rest of the current epoch; False if max_steps stopped it midway."""
    tc, prog = s.cfg.train, s.prog
    plan = s.train_b.epoch_plan(prog.epoch, tc.seed, tc.negatives, tc.batch_size if tc.bucket else 0)
    n_steps = (len(plan) + tc.batch_size - 1) // tc.batch_size
    total = min(tc.epochs * n_steps, tc.max_steps or tc.epochs * n_steps)
    show = s.progress and s.rank == 0
    bar = tqdm(
        total=n_steps,
        initial=prog.step_in_epoch,
        desc=f"epoch {prog.epoch + 1}/{tc.epochs}",
        unit="step",
        disable=not show,
    )
    s.model.train()
    window = {"loss": 0.0, "n": 0, "t0": time.time(), "samples": prog.samples}
    while prog.step_in_epoch < n_steps and not s.out_of_steps():
        units = plan[prog.step_in_epoch * tc.batch_size : (prog.step_in_epoch + 1) * tc.batch_size]
        loss = train_step(s, units, tc.lr_factor(prog.global_step, total))
        prog.step_in_epoch += 1
        prog.global_step += 1
        prog.samples += int(s.train_b.rows_in(units, tc.negatives))
        window["loss"] += loss
        window["n"] += 1
        bar.update(1)
        if prog.global_step % tc.log_every == 0 or prog.step_in_epoch == n_steps:
            log_window(s, window, n_steps, bar)
        if s.rank == 0 and tc.checkpoint_every and prog.global_step % tc.checkpoint_every == 0:
            prog.train_time = time.time() - s.t_start
            save_checkpoint(s.ckpt, s.model, s.opt, prog, s.cfg, s.scaler)
    bar.close()
    return prog.step_in_epoch >= n_steps


def train_step(s: Setup, units: np.ndarray, lr_factor: float) -> float:
    """One optimiser step over a global batch of units. Each rank takes every world-th unit and
    each loss is divided by the global row count, so the summed DDP gradient equals the
    single-process one; `train.accumulate` micro-batches add up to the same gradient."""
    tc, prog = s.cfg.train, s.prog
    mine = units[s.rank :: s.world]
    rng = np.random.default_rng([tc.seed, prog.epoch, prog.step_in_epoch, s.rank])
    denom = (s.train_b.rows_in(units, tc.negatives) if tc.loss == "bce" else float(len(units))) / s.world
    for g in s.opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor
    s.opt.zero_grad(set_to_none=True)
    chunks = [c for c in np.array_split(mine, min(tc.accumulate, max(1, len(mine)))) if len(c)]
    total = 0.0
    for i, chunk in enumerate(chunks):
        batch = s.train_b.train_batch(chunk, tc.negatives, rng).to(s.device)
        sync = s.world > 1 and i < len(chunks) - 1
        with s.net.no_sync() if sync else nullcontext(), autocast(s.cfg, s.device):
            loss = batch_loss(s.net(batch), batch, s.cfg, denom)
            if not torch.isfinite(loss):
                kept = "the last good checkpoint is kept" if s.ckpt.is_file() else "no checkpoint was written"
                raise FloatingPointError(
                    f"non-finite training loss at step {prog.global_step + 1} (epoch {prog.epoch + 1}); "
                    f"stopped, {kept} in {s.out}"
                )
            s.scaler.scale(loss).backward()
        total += loss.item()
    if tc.grad_clip > 0:
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), tc.grad_clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    return total * s.world


def log_window(s: Setup, w: dict, n_steps: int, bar) -> None:
    prog = s.prog
    sps = (prog.samples - w["samples"]) / max(time.time() - w["t0"], 1e-9)
    row = {
        "step": prog.global_step,
        "epoch": prog.epoch + prog.step_in_epoch / n_steps,
        "loss": round(w["loss"] / max(w["n"], 1), 5),
        "samples_per_s": round(sps, 1),
        "time_s": round(time.time() - s.t_start, 1),
    }
    prog.log.append(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{sps:.0f}")
    if s.board is not None:
        s.board.add_scalar("train/loss", row["loss"], prog.global_step)
        s.board.add_scalar("train/samples_per_s", sps, prog.global_step)
        s.board.add_scalar("train/lr", s.opt.param_groups[0]["lr"], prog.global_step)
    w.update(loss=0.0, n=0, t0=time.time(), samples=prog.samples)


# -- phase 3: end of epoch ------------------------------------------------------------------------
def end_epoch(s: Setup) -> None:
    """Validate (rank 0 scores; the others wait), early stopping on AUC, checkpoint."""
    prog = s.prog
    prog.train_time = time.time() - s.t_start
    if s.rank == 0:
        validate(s)
    if s.world > 1:  # on the device: NCCL takes CUDA tensors only
        flag = torch.tensor([float(prog.stopped)], device=s.device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, 0)
        prog.stopped = bool(flag.item())
    prog.epoch += 1
    prog.step_in_epoch = 0
    if s.rank == 0:
        save_checkpoint(s.ckpt, s.model, s.opt, prog, s.cfg, s.scaler)
        write_log(s.out, prog.log)


def validate(s: Setup) -> None:
    prog, tc = s.prog, s.cfg.train
    scores = score_impressions(
        s.model, s.valid_b, tc.eval_batch_size, s.device, s.progress, desc="validating"
    )
    m = evaluate_scores(s.valid_b, scores)
    prog.log.append(
        {
            "step": prog.global_step,
            "epoch": prog.epoch + 1,
            **{f"valid_{k.replace('@', '')}": round(m[k], 5) for k in ("auc", "mrr", "ndcg@5", "ndcg@10")},
            "time_s": round(time.time() - s.t_start, 1),
        }
    )
    if s.board is not None:
        for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
            s.board.add_scalar(f"valid/{k}", m[k], prog.epoch + 1)
    if m["auc"] > prog.best_auc:
        prog.best_auc, prog.best_epoch, prog.bad_epochs, prog.best_valid = m["auc"], prog.epoch + 1, 0, m
        save_weights(s.model, s.cfg, s.out / "model.safetensors")
    else:
        prog.bad_epochs += 1
        prog.stopped = prog.bad_epochs >= tc.patience
    if s.progress:
        tqdm.write(
            f"epoch {prog.epoch + 1}: valid auc {m['auc']:.4f} mrr {m['mrr']:.4f} "
            f"ndcg@5 {m['ndcg@5']:.4f} ndcg@10 {m['ndcg@10']:.4f}",
            file=sys.stderr,
        )


# -- phase 4: finish ------------------------------------------------------------------------------
def finish(s: Setup) -> dict:
    prog, tc = s.prog, s.cfg.train
    prog.train_time = time.time() - s.t_start
    result = {
        "valid": prog.best_valid,
        "best_epoch": prog.best_epoch,
        "epochs_run": prog.epoch,
        "steps": prog.global_step,
        "train_samples_per_s": round(prog.samples / max(prog.train_time, 1e-9), 1),
        "time_s": round(prog.train_time, 1),
        "finished": prog.epoch >= tc.epochs or prog.stopped,
    }
    if s.rank == 0:
        save_checkpoint(s.ckpt, s.model, s.opt, prog, s.cfg, s.scaler)
        if not (s.out / "model.safetensors").exists():  # no epoch finished yet: keep the current weights
            save_weights(s.model, s.cfg, s.out / "model.safetensors")
        write_log(s.out, prog.log)
        plot_curves(s.out, prog.log)
        (s.out / "metrics.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
    if s.board is not None:
        s.board.close()
    if s.world > 1:
        dist.barrier()
    return result
