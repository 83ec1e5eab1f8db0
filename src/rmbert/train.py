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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from rmbert.config import RunConfig
from rmbert.data.batching import Batch, ImpressionBatcher
from rmbert.data.mind import Split, load_split
from rmbert.evaluate import evaluate_scores, jsonable, score_impressions
from rmbert.models.base import NEG
from rmbert.models.features import FeatureVocab
from rmbert.models.registry import NewsRecModel, resolve
from rmbert.run import build_model, feature_ids, load_encoder, load_weights, save_weights, store_for, weights

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
    path: Path, model: NewsRecModel, opt: torch.optim.Optimizer, prog: Progress, cfg: RunConfig
) -> None:
    state = {
        "model": weights(model, cfg),
        "optimizer": opt.state_dict(),
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


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A random `fraction` of the training impressions held out for validation (the paper's protocol)."""
    n = len(split.impressions)
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    n_valid = max(1, int(round(n * fraction)))
    valid_rows, train_rows = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    imps = split.impressions
    return Split(split.path, split.news, imps.subset(train_rows)), Split(
        split.path, split.news, imps.subset(valid_rows)
    )


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
    out = Path(out)
    rank, world = distributed()
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no config.json)")
        saved = RunConfig.load(out / "config.json")
        if budget is None:
            budget = {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}
        cfg = replace(saved, train=replace(saved.train, **budget))
    elif (out / "config.json").exists() or ckpt_path.exists():
        raise FileExistsError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )

    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)

    train_split = load_split(train_dir)
    if not train_split.impressions.has_labels:
        raise ValueError(f"{train_dir}: the training split has no labels (a test split)")
    if valid_dir is not None:
        valid_split = load_split(valid_dir)
    else:
        if len(train_split.impressions) < 2:
            raise ValueError(
                f"{train_dir}: {len(train_split.impressions)} impressions; too few to hold out validation"
            )
        train_split, valid_split = split_validation(train_split, cfg.train.valid_fraction, cfg.train.seed)
    for name, sp in (("training", train_split), ("validation", valid_split)):
        if len(sp.impressions) == 0:
            raise ValueError(f"{sp.path}: the {name} split has no impressions")

    encoder, tokenizer = load_encoder(cfg)
    users = train_split.impressions.users
    user_index = {u: i + 1 for i, u in enumerate(users)}
    vocab = FeatureVocab.fit(train_split.news, cfg.features) if cfg.features.any else None
    cfg = resolve(cfg, encoder.dim, len(users), vocab)
    if rank != 0:
        dist.barrier()  # rank 0 builds the news store first; the others then open it
    store = store_for(cfg, encoder, tokenizer, [train_split, valid_split], progress and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    torch.manual_seed(cfg.train.seed)  # the recommender's initial weights depend on the seed only
    model = build_model(cfg, encoder, store).to(device)
    model.set_feature_ids(feature_ids(cfg, vocab, store, [train_split, valid_split]))
    if cfg.encoder.mode == "frozen" and cfg.encoder.standardize:
        model.news.fit_standardizer(seed=cfg.train.seed)
    rows = store.rows(train_split.news.ids)
    train_b = ImpressionBatcher(train_split.impressions, rows, cfg.train.max_history, user_index)
    valid_b = ImpressionBatcher(
        valid_split.impressions, store.rows(valid_split.news.ids), cfg.train.max_history, user_index
    )

    enc_params = [p for p in model.news.parameters() if p.requires_grad]
    rec_params = [p for p in model.rec.parameters() if p.requires_grad]
    groups = [{"params": rec_params, "lr": cfg.train.lr, "base_lr": cfg.train.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.train.encoder_lr, "base_lr": cfg.train.encoder_lr})
    opt = torch.optim.Adam(groups, weight_decay=cfg.train.weight_decay)

    prog = Progress()
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        load_weights(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        prog = Progress(**state["progress"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        tokenizer.save_pretrained(out / "tokenizer")
        (out / "users.txt").write_text("\n".join(users))
        if vocab is not None:
            vocab.save(out / "features.json")

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    tc = cfg.train
    t_start = time.time() - prog.train_time
    while prog.epoch < tc.epochs and not prog.stopped:
        plan = train_b.epoch_plan(prog.epoch, tc.seed, tc.negatives, tc.batch_size if tc.bucket else 0)
        n_steps = (len(plan) + tc.batch_size - 1) // tc.batch_size
        bar = tqdm(
            total=n_steps,
            initial=prog.step_in_epoch,
            desc=f"epoch {prog.epoch + 1}/{tc.epochs}",
            unit="step",
            disable=not (progress and rank == 0),
        )
        model.train()
        run_loss, run_n, t0, s0 = 0.0, 0, time.time(), prog.samples
        while prog.step_in_epoch < n_steps:
            if tc.max_steps and prog.global_step >= tc.max_steps:
                break
            units = plan[prog.step_in_epoch * tc.batch_size : (prog.step_in_epoch + 1) * tc.batch_size]
            # Each rank takes every world-th unit of the global batch; the loss is divided by the
            # global row count, so the summed DDP gradient equals the single-process one.
            mine = units[rank::world]
            rng = np.random.default_rng([tc.seed, prog.epoch, prog.step_in_epoch, rank])
            batch = train_b.train_batch(mine, tc.negatives, rng).to(device)
            denom = train_b.rows_in(units, tc.negatives) if tc.loss == "bce" else float(len(units))
            with autocast(cfg, device):
                logits = net(batch)
            loss = batch_loss(logits, batch, cfg, denom / world)
            if not torch.isfinite(loss):
                kept = (
                    "the last good checkpoint is kept" if ckpt_path.is_file() else "no checkpoint was written"
                )
                raise FloatingPointError(
                    f"non-finite training loss at step {prog.global_step + 1} (epoch {prog.epoch + 1}); "
                    f"stopped, {kept} in {out}"
                )
            total = min(tc.epochs * n_steps, tc.max_steps or tc.epochs * n_steps)
            lr_f = tc.lr_factor(prog.global_step, total)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_f
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            prog.step_in_epoch += 1
            prog.global_step += 1
            prog.samples += int(train_b.rows_in(units, tc.negatives))
            run_loss += loss.item() * world
            run_n += 1
            bar.update(1)
            if prog.global_step % tc.log_every == 0 or prog.step_in_epoch == n_steps:
                elapsed = time.time() - t0
                sps = (prog.samples - s0) / max(elapsed, 1e-9)
                row = {
                    "step": prog.global_step,
                    "epoch": prog.epoch + prog.step_in_epoch / n_steps,
                    "loss": round(run_loss / run_n, 5),
                    "samples_per_s": round(sps, 1),
                    "time_s": round(time.time() - t_start, 1),
                }
                prog.log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{sps:.0f}")
                run_loss, run_n = 0.0, 0
            if rank == 0 and tc.checkpoint_every and prog.global_step % tc.checkpoint_every == 0:
                prog.train_time = time.time() - t_start
                save_checkpoint(ckpt_path, model, opt, prog, cfg)
        bar.close()
        if prog.step_in_epoch < n_steps:  # stopped by max_steps mid-epoch: keep a resumable state
            break
        # End of epoch: validate (rank 0 scores; the others wait), early stopping on AUC.
        prog.train_time = time.time() - t_start
        if rank == 0:
            scores = score_impressions(
                model, valid_b, tc.eval_batch_size, device, progress, desc="validating"
            )
            m = evaluate_scores(valid_b, scores)
            prog.log.append(
                {
                    "step": prog.global_step,
                    "epoch": prog.epoch + 1,
                    "valid_auc": round(m["auc"], 5),
                    "valid_mrr": round(m["mrr"], 5),
                    "valid_ndcg5": round(m["ndcg@5"], 5),
                    "valid_ndcg10": round(m["ndcg@10"], 5),
                    "time_s": round(time.time() - t_start, 1),
                }
            )
            if m["auc"] > prog.best_auc:
                prog.best_auc, prog.best_epoch, prog.bad_epochs, prog.best_valid = (
                    m["auc"],
                    prog.epoch + 1,
                    0,
                    m,
                )
                save_weights(model, cfg, out / "model.safetensors")
            else:
                prog.bad_epochs += 1
                prog.stopped = prog.bad_epochs >= tc.patience
            if progress:
                tqdm.write(
                    f"epoch {prog.epoch + 1}: valid auc {m['auc']:.4f} mrr {m['mrr']:.4f} "
                    f"ndcg@5 {m['ndcg@5']:.4f} ndcg@10 {m['ndcg@10']:.4f}",
                    file=sys.stderr,
                )
        if world > 1:
            flag = torch.tensor([float(prog.stopped)])
            dist.broadcast(flag, 0)
            prog.stopped = bool(flag.item())
        prog.epoch += 1
        prog.step_in_epoch = 0
        if rank == 0:
            save_checkpoint(ckpt_path, model, opt, prog, cfg)
            write_log(out, prog.log)
    prog.train_time = time.time() - t_start
    result = {
        "valid": prog.best_valid,
        "best_epoch": prog.best_epoch,
        "epochs_run": prog.epoch,
        "steps": prog.global_step,
        "train_samples_per_s": round(prog.samples / max(prog.train_time, 1e-9), 1),
        "time_s": round(prog.train_time, 1),
        "finished": prog.epoch >= tc.epochs or prog.stopped,
    }
    if rank == 0:
        save_checkpoint(ckpt_path, model, opt, prog, cfg)
        if not (out / "model.safetensors").exists():  # no epoch finished yet: keep the current weights
            save_weights(model, cfg, out / "model.safetensors")
        write_log(out, prog.log)
        plot_curves(out, prog.log)
        (out / "metrics.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return result
