"""The checks a machine with a GPU runs in under 10 minutes (`benchmarks/gpu_check.sh` calls this).

1. the test suite, with CUDA visible (training tests then take the GPU, as `train.device=auto` does);
2. a short frozen run and a short full fine-tune of a bert-base-shaped encoder (hidden 768, 12
   layers, random weights: the device machine has no model hub) with AMP: bf16, and fp16 with its
   gradient scaler and gradient accumulation;
3. 2-process NCCL DDP under torchrun when the machine has 2 GPUs or more;
4. the reasoning benchmark on the GPU and the serving benchmark with the model on the GPU.

Each step's result (or its error) goes into one JSON object, printed as the last line; a failing
step never hides the others. Usage: python benchmarks/gpu_check.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(results: dict, name: str, fn) -> None:
    t0 = time.time()
    try:
        results[name] = {"ok": True, **(fn() or {})}
    except Exception as e:  # a step's failure is a result too
        results[name] = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}"[-2000:],
            "trace": traceback.format_exc()[-3000:],
        }
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(
        f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)",
        file=sys.stderr,
    )


def run(cmd: list[str], timeout: int, env: dict | None = None) -> str:
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT
    )
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    return p.stdout


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def bert_base_shaped(out: Path) -> Path:
    from rmbert.data.words import FILLERS, TOPICS
    from rmbert.encoders.bert import save_tiny_encoder

    words = [w for subs in TOPICS.values() for ws in subs.values() for w in ws] + FILLERS
    return save_tiny_encoder(out / "bert-base-shaped", words, hidden=768, layers=12)


def train_args(data: Path, enc: Path, out: Path, mode: str, sets: list[str]) -> list[str]:
    """`rmbert train` on data/train, validated on data/dev, one epoch (without the interpreter)."""
    args = ["-m", "rmbert", "--quiet", "train", "--train", str(data / "train"), "--valid", str(data / "dev")]
    args += ["--out", str(out), "--encoder", str(enc), "--encoder-mode", mode, "--epochs", "1"]
    for s in sets:
        args += ["--set", s]
    return args


def train_run(data: Path, enc: Path, out: Path, mode: str, sets: list[str]) -> dict:
    args = [sys.executable, *train_args(data, enc, out, mode, sets)]
    r = json.loads(run(args, 400))
    return {k: r[k] for k in ("steps", "train_samples_per_s", "time_s")} | {
        "valid_auc": r["valid"].get("auc")
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run of this script)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    from rmbert.data.synth import SynthConfig, synth

    results: dict = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    steps = 5 if a.quick else 60
    data = a.out / "planted"
    if not (data / "oracle.json").is_file():
        synth(data, SynthConfig(users=300 if a.quick else 2000, seed=0))
    enc = bert_base_shaped(a.out)
    if not a.quick:
        step(
            results, "tests", lambda: {"tail": run([sys.executable, "-m", "pytest", "-q", "-x"], 300)[-300:]}
        )
    common = [f"train.max_steps={steps}", "train.checkpoint_every=0", "train.batch_size=50"]
    step(
        results,
        "frozen_bf16",
        lambda: train_run(data, enc, a.out / "frozen", "frozen", [*common, "train.amp=bf16"]),
    )
    full = [f"train.max_steps={max(2, steps // 3)}", "train.checkpoint_every=0", "train.batch_size=50"]
    step(
        results,
        "full_bf16",
        lambda: train_run(data, enc, a.out / "full-bf16", "full", [*full, "train.amp=bf16"]),
    )
    step(
        results,
        "full_fp16_accumulate2",
        lambda: train_run(
            data, enc, a.out / "full-fp16", "full", [*full, "train.amp=fp16", "train.accumulate=2"]
        ),
    )
    if results["gpus"] >= 2:

        def ddp() -> dict:
            args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            args += train_args(data, enc, a.out / "ddp", "frozen", [f"train.max_steps={steps}"])
            return {"tail": run(args, 400)[-400:]}

        step(results, "ddp_nccl_2gpu", ddp)
    else:
        results["ddp_nccl_2gpu"] = {"ok": None, "skipped": "one GPU"}
    device = "cuda" if results["cuda"] else "cpu"
    reps = "5" if a.quick else "40"
    step(
        results,
        "reasoning",
        lambda: last_json(
            run([sys.executable, "benchmarks/reasoning.py", "--device", device, "--repeats", reps], 300)
        ),
    )
    secs = "3" if a.quick else "10"
    serve = [
        sys.executable,
        "benchmarks/serve_load.py",
        "--device",
        device,
        "--seconds",
        secs,
        "--out",
        str(a.out / "serve"),
    ]
    step(results, "serving", lambda: last_json(run(serve, 400)))
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                k: ({kk: vv for kk, vv in v.items() if kk != "trace"} if isinstance(v, dict) else v)
                for k, v in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
