"""DDP under torchrun on CPU (gloo): 2 processes give the weights of 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# Biases that add the same constant to every logit of a softmax get an analytic gradient of zero;
# Adam turns their float noise into steps, so they may differ between runs without changing any score.
SHIFT_ONLY = {"rec.W_alpha.bias", "rec.W_beta.bias", "rec.W_I.bias"}


def same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k not in SHIFT_ONLY:
            assert torch.allclose(a[k], b[k], atol=1e-5), k


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
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    same_weights(a, b)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["valid"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["valid"]
    assert m1["auc"] == pytest.approx(m2["auc"], abs=1e-4) and m1["mrr"] == pytest.approx(m2["mrr"], abs=1e-4)
    # resume across a restart: stop after 5 steps, then continue with 2 processes
    run_train([*common, "--out", str(tmp_path / "r"), "--set", "train.max_steps=5"], 2, tmp_path)
    run_train([*common, "--out", str(tmp_path / "r"), "--resume"], 2, tmp_path)
    same_weights(a, load_file(str(tmp_path / "r" / "model.safetensors")))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_distributed_is_available():
    assert torch.distributed.is_gloo_available()
