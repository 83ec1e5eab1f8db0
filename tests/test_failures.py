"""Bad runs fail loudly: impossible budgets, NaN, planted pickles, truncated files, missing news."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import write_split

from rmbert.cli import main


def train_args(tiny_encoder, planted, out, *extra):
    return [
        "--quiet",
        "train",
        "--train",
        str(planted / "train"),
        "--valid",
        str(planted / "dev"),
        "--out",
        str(out),
        "--encoder",
        str(tiny_encoder),
        "--set",
        "encoder.max_title_len=12",
        "--set",
        "rmbert.steps=2",
        "--set",
        "train.batch_size=16",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--epochs", "0"], "train.epochs"),
        (["--set", "train.batch_size=-1"], "train.batch_size"),
        (["--set", "train.lr=nan"], "train.lr"),
        (["--set", "train.lr=0"], "train.lr"),
        (["--set", "train.valid_fraction=1.5"], "valid_fraction"),
        (["--set", "train.patience=0"], "train.patience"),
        (["--set", "rmbert.dropout=1.5"], "rmbert.dropout"),
        (["--set", "encoder.pooling=max"], "encoder.pooling"),
    ],
)
def test_impossible_budgets_are_refused(tiny_encoder, planted, tmp_path, capsys, extra, needle):
    assert main(train_args(tiny_encoder, planted, tmp_path / "r", *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_an_encoder_that_does_not_resolve_is_a_clear_error(tiny_encoder, planted, tmp_path, capsys):
    """Offline, a name that is no local folder and no cached hub model: exit 2 with the name,
    before the data is read (a split that does not exist is never looked at)."""
    args = train_args(tmp_path / "no-such-encoder", planted, tmp_path / "r")
    args[args.index("--train") + 1] = str(tmp_path / "no-such-split")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no-such-encoder" in err and "not a local model folder" in err and "Traceback" not in err


def test_an_empty_split_is_refused(tiny_encoder, planted, tmp_path, capsys):
    empty = write_split(tmp_path / "empty", ["N1\tsports\tsub\tstorm\t\turl\t[]\t[]"], [])
    args = train_args(tiny_encoder, planted, tmp_path / "r")
    args[args.index("--train") + 1] = str(empty)
    assert main(args) == 2
    assert "impressions" in capsys.readouterr().err


def test_a_non_finite_loss_stops_training_naming_the_step(
    tiny_encoder, planted, tmp_path, monkeypatch, capsys
):
    import rmbert.train as train_mod

    real, calls = train_mod.batch_loss, [0]

    def poisoned(logits, batch, cfg, denom):
        calls[0] += 1
        loss = real(logits, batch, cfg, denom)
        return loss * float("nan") if calls[0] == 7 else loss

    monkeypatch.setattr(train_mod, "batch_loss", poisoned)
    out = tmp_path / "r"
    assert main(train_args(tiny_encoder, planted, out, "--set", "train.checkpoint_every=3")) == 2
    err = capsys.readouterr().err
    assert "non-finite training loss at step 7" in err and "last good checkpoint" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["progress"]["global_step"] == 6  # the checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class Planted:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_resume_never_runs_code_from_a_checkpoint(tiny_encoder, planted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert main(train_args(tiny_encoder, planted, out, "--set", "train.max_steps=2")) == 0
    capsys.readouterr()
    with open(out / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Planted()}, f)
    monkeypatch.chdir(tmp_path)
    assert main(train_args(tiny_encoder, planted, out, "--resume")) == 2
    assert not (tmp_path / "PWNED").exists()
    assert "checkpoint.pt" in capsys.readouterr().err


def test_resume_without_epochs_keeps_the_saved_budget(tiny_encoder, planted, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(train_args(tiny_encoder, planted, out, "--epochs", "2", "--set", "train.max_steps=3")) == 0
    capsys.readouterr()
    assert main(train_args(tiny_encoder, planted, out, "--resume", "--set", "train.max_steps=0")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finished"] and result["epochs_run"] == 2  # not the default 3
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
    # a --set that would change the model on resume is refused
    assert main(train_args(tiny_encoder, planted, out, "--resume", "--set", "rmbert.steps=3")) == 2
    assert "rmbert.steps=3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tiny_encoder, planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(train_args(tiny_encoder, planted, out, "--set", "train.max_steps=3")) == 0
    return out


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors", "config.json", "users.txt"])
def test_truncated_run_files_name_the_file(trained, planted, tmp_path, capsys, name):
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    f = run / name
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)] + (b"\xff" if name == "users.txt" else b""))
    if name == "checkpoint.pt":
        args = ["--quiet", "train", "--train", str(planted / "train"), "--out", str(run), "--resume"]
    else:
        args = ["--quiet", "evaluate", str(run), "--split", str(planted / "dev")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


def test_a_config_with_a_wrong_type_is_refused(trained, planted, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["epochs"] = "abc"
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["--quiet", "evaluate", str(run), "--split", str(planted / "dev")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "train.epochs must be int" in err


def test_missing_candidates_warn_with_counts_or_fail_under_strict(trained, planted, tmp_path, capsys):
    dev = tmp_path / "dev"
    shutil.copytree(planted / "dev", dev)
    lines = (dev / "behaviors.tsv").read_text().splitlines()
    cols = lines[0].split("\t")
    cols[4] += " GONE1-0 GONE2-0"
    lines[0] = "\t".join(cols)
    (dev / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    assert main(["--quiet", "evaluate", str(trained), "--split", str(dev)]) == 0
    captured = capsys.readouterr()
    assert "2 of" in captured.err and "2 news ids missing from news.tsv" in captured.err
    assert json.loads(captured.out)["impressions"] > 0
    assert main(["--quiet", "evaluate", str(trained), "--split", str(dev), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err


def test_json_output_never_holds_nan(trained, planted, tmp_path, capsys):
    dev = tmp_path / "dev"
    shutil.copytree(planted / "dev", dev)
    lines = (dev / "behaviors.tsv").read_text().splitlines()[:3]
    lines = ["\t".join([*ln.split("\t")[:4], ln.split("\t")[4].split()[0][:-2] + "-1"]) for ln in lines]
    (dev / "behaviors.tsv").write_text("\n".join(lines) + "\n")  # one candidate each: no AUC anywhere
    assert main(["--quiet", "evaluate", str(trained), "--split", str(dev)]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out)["auc"] is None and json.loads(out)["skipped"] == 3


def test_predict_into_a_folder_is_an_error_and_leaves_nothing(trained, planted, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    assert (
        main(["--quiet", "predict", str(trained), "--split", str(planted / "dev"), "--out", str(target)]) == 2
    )
    assert "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(target.iterdir())
