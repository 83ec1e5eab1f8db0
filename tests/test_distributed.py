"""DDP under torchrun on CPU (gloo): 2 processes give the weights of 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rmbert.data.mind import load_split
from rmbert.evaluate import score_impressions
from rmbert.run import load_run

# Parameters that only add the same constant to every logit of a softmax, so their analytic gradient
# is zero and Adam turns float noise into steps: b_a (title logits, eq. 3), b_beta and v . b_I
# (history logits, eq. 6), and b_H, which enters them as ((W_I1^T v) * r) . b_H for every item j.
SHIFT_ONLY = {"rec.W_alpha.bias", "rec.W_beta.bias", "rec.W_I.bias", "rec.W_H.bias"}


def same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k not in SHIFT_ONLY:
            assert torch.allclose(a[k], b[k], atol=1e-5), (k, float((a[k] - b[k]).abs().max()))


def split_logits(run_dir, split_dir):
    """What users see: the run's click logits for every candidate row of a split."""
    run = load_run(run_dir)
    split = load_split(split_dir)
    batcher = run.batcher(split, run.store([split], progress=False))
    return torch.from_numpy(score_impressions(run.model, batcher, 16))


def same_run(a_dir, b_dir, split_dir):
    """Two runs are the same model: equal weights (but shift-only biases) and equal logits on a split."""
    same_weights(load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors")))
    la, lb = split_logits(a_dir, split_dir), split_logits(b_dir, split_dir)
    assert la.std() > 1e-3  # the logits carry signal: a constant model would pass trivially
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def run_train(args, nproc, tmp_path, env_extra=None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "rmbert",
        "--quiet",
        "train",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_two_processes_equal_one(tiny_encoder, planted, tmp_path):
    common = [
        "--train",
        str(planted / "train"),
        "--valid",
        str(planted / "dev"),
        "--encoder",
        str(tiny_encoder),
        "--epochs",
        "2",
        "--set",
        "encoder.max_title_len=12",
        "--set",
        "rmbert.steps=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.checkpoint_every=0",
    ]
    run_train([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    run_train([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", planted / "dev")
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["valid"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["valid"]
    assert m1["auc"] == pytest.approx(m2["auc"], abs=1e-4) and m1["mrr"] == pytest.approx(m2["mrr"], abs=1e-4)
    # resume across a restart: stop after 5 steps, then continue with 2 processes
    run_train([*common, "--out", str(tmp_path / "r"), "--set", "train.max_steps=5"], 2, tmp_path)
    run_train([*common, "--out", str(tmp_path / "r"), "--resume", "--set", "train.max_steps=0"], 2, tmp_path)
    same_run(tmp_path / "one", tmp_path / "r", planted / "dev")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_distributed_is_available():
    assert torch.distributed.is_gloo_available()
