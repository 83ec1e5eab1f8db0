"""NRMS, LSTUR, NPA and the w/o BERT encoder in the shared interface."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import assert_encoded_once_as_each_slot
from test_train import tiny_cfg

from rmbert.models.lstur import LSTUR, LSTURConfig
from rmbert.models.npa import NPA, NPAConfig
from rmbert.models.nrms import NRMS, NRMSConfig
from rmbert.train import train
from rmbert.types import NewsRepr

B, C, M, L, E = 3, 4, 6, 5, 16


def inputs(seed=0, words=True):
    g = torch.Generator().manual_seed(seed)
    hm = torch.rand(B, M, generator=g) > 0.3
    hm[:, 0] = True
    hm[2] = False  # an empty history
    tm = torch.rand(B, M, L, generator=g) > 0.3
    tm[..., 0] = True
    hist = NewsRepr(
        torch.randn(B, M, E, generator=g),
        torch.randn(B, M, L, E, generator=g) if words else None,
        tm if words else None,
    )
    cm = torch.rand(B, C, L, generator=g) > 0.3
    cm[..., 0] = True
    cand = NewsRepr(torch.randn(B, C, E, generator=g), torch.randn(B, C, L, E, generator=g), cm)
    return hist, hm, cand


def models(words):
    small = dict(dim=E, word_encoder=words)
    return [
        NRMS(NRMSConfig(heads=2, head_dim=4, query_dim=8, **small)),
        LSTUR(LSTURConfig(filters=8, query_dim=8, num_users=5, **small)),
        LSTUR(LSTURConfig(filters=8, query_dim=8, num_users=5, combine="con", **small)),
        NPA(NPAConfig(filters=8, user_dim=4, query_dim=8, num_users=5, **small)),
    ]


@pytest.mark.parametrize("words", [False, True])
def test_shapes_masks_empty_history_and_unknown_users(words):
    torch.manual_seed(0)
    hist, hm, cand = inputs(words=words)
    users = torch.tensor([1, 0, 7])  # 0 = unknown; 7 is beyond the table and treated as unknown-safe
    for m in models(words):
        m.eval()
        y = m(hist, hm, cand, users)
        assert y.shape == (B, C) and torch.isfinite(y).all(), m.name
        # padded history slots and padded title tokens never matter
        noisy = NewsRepr(torch.where(hm[..., None], hist.cls, 99.0), None, None)
        if words:
            noisy = NewsRepr(
                noisy.cls,
                torch.where(hist.mask[..., None] & hm[..., None, None], hist.tokens, 99.0),
                hist.mask,
            )
        cand2 = NewsRepr(cand.cls, torch.where(cand.mask[..., None], cand.tokens, -99.0), cand.mask)
        assert torch.allclose(m(noisy, hm, cand2, users), y, atol=1e-5), m.name


def test_lstur_unknown_user_has_no_long_term_vector():
    m = LSTUR(LSTURConfig(dim=E, filters=8, query_dim=8, num_users=5)).eval()
    assert torch.equal(m.long_term(torch.tensor([0]), 1, "cpu"), torch.zeros(1, 8))
    assert m.long_term(torch.tensor([3]), 1, "cpu").abs().sum() > 0


@pytest.mark.parametrize("words", [False, True])
def test_each_baseline_overfits_a_batch(words):
    hist, hm, cand = inputs(1, words=words)
    y = (torch.rand(B, C, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    y[2] = 0  # the empty-history user scores only through the candidate side
    users = torch.tensor([1, 2, 3])
    for m in models(words):
        torch.manual_seed(0)
        no_noise = {"lstur": {"user_mask_prob": 0.0}, "npa": {"user_dropout": 0.0}}.get(m.name, {})
        m = type(m)(dataclasses.replace(m.cfg, dropout=0.0, **no_noise))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(400):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(hist, hm, cand, users)[:2], y[:2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.05, m.name


@pytest.mark.parametrize(
    "model,mode", [("nrms", "frozen"), ("lstur", "words"), ("npa", "words"), ("rmbert", "lstm")]
)
def test_trains_end_to_end(tiny_encoder, planted, tmp_path, model, mode):
    cfg = dataclasses.replace(tiny_cfg(tiny_encoder, mode=mode, batch_size=32), model=model)
    if mode == "words":  # without history positions, so that each distinct news is encoded once
        cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, history_position=False))
    r = train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    assert r["finished"] and 0.0 <= r["valid"]["auc"] <= 1.0
    assert not np.isnan(r["valid"]["mrr"])
    if model == "lstur":  # its GRU reads the clicks moved to the front: gathered, not encoded in place
        assert_encoded_once_as_each_slot(tmp_path / "r", planted / "dev")


def test_words_mode_is_not_for_rmbert(tiny_encoder, planted, tmp_path):
    cfg = tiny_cfg(tiny_encoder, mode="words")
    with pytest.raises(ValueError, match="lstm"):
        train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)


def test_tiny_reproduce_grid_end_to_end(tiny_encoder, planted, tmp_path, capsys):
    from rmbert.cli import main

    out = tmp_path / "grid"
    args = [
        "--quiet",
        "reproduce",
        "figure2",
        "--train",
        str(planted / "train"),
        "--test",
        str(planted / "dev"),
        "--out",
        str(out),
        "--seeds",
        "1",
        "--rows",
        "RMBERT,w/o PM",
        "--max-steps",
        "2",
        "--encoder",
        str(tiny_encoder),
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)["rows"]
    assert [s["row"] for s in summary] == ["RMBERT", "w/o PM"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(0 <= float(r["auc"]) <= 1 for r in rows)
    md = (out / "figure2.md").read_text()
    assert "| RMBERT | 1 |" in md and "| w/o PM | 1 |" in md and "validation peaked" in md
    from PIL import Image

    assert Image.open(out / "figure2.png").size[0] > 500
    # a second call finds every run finished and trains nothing
    stamp = (out / "runs" / "rmbert" / "seed0" / "result.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "rmbert" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    cfg = json.loads((out / "runs" / "w-o-pm" / "seed0" / "config.json").read_text())
    assert cfg["rmbert"]["prev_memory"] is False


def test_table1_lists_paper_numbers(tmp_path):
    from rmbert.reproduce import markdown

    md = markdown(
        "table1",
        [
            {
                "row": "RMBERT",
                "seeds": 3,
                "paper": "RMBERT",
                "auc": 0.7,
                "auc_std": 0.01,
                "mrr": 0.3,
                "mrr_std": 0.0,
                "ndcg@5": 0.3,
                "ndcg@5_std": 0.0,
                "ndcg@10": 0.4,
                "ndcg@10_std": 0.0,
            }
        ],
    )
    assert "| RMBERT | 3 | 0.7000 ± 0.0100 |" in md and "0.6746 | 0.3249 | 0.3614" in md


def test_table_reports_each_rows_budget():
    """The budget columns: best epoch of each seed's run, whether validation stopped rising in
    every seed (a row whose best epoch was its last is marked still rising), samples/s."""
    from rmbert.reproduce import markdown, summarize

    metrics = {"auc": 0.7, "mrr": 0.3, "ndcg@5": 0.3, "ndcg@10": 0.4}
    rows = [reproduce_row("A"), reproduce_row("B")]
    results = [
        {"row": "A", "seed": 0, **metrics, "best_epoch": 2, "epochs_run": 4, "samples_per_s": 100.0},
        {"row": "A", "seed": 1, **metrics, "best_epoch": 3, "epochs_run": 5, "samples_per_s": 300.0},
        {"row": "B", "seed": 0, **metrics, "best_epoch": 2, "epochs_run": 3, "samples_per_s": 50.0},
        {"row": "B", "seed": 1, **metrics, "best_epoch": 4, "epochs_run": 4, "samples_per_s": 50.0},
    ]
    summary = summarize(results, rows)
    assert summary[0]["peaked"] and not summary[1]["peaked"] and summary[0]["samples_per_s"] == 200.0
    md = markdown("table1", summary)
    assert "| A | 2 | 0.7000 ± 0.0000 |" in md and "| 2/4, 3/5 | yes | 200 |" in md
    assert "| 2/3, 4/4 | **no: still rising** | 50 |" in md
    one_seed = markdown("table1", summarize(results[:1], rows))
    assert (
        "| A | 1 | 0.7000 | 0.3000 | 0.3000 | 0.4000 | 2/4 |" in one_seed
        and "±" not in one_seed.split("\n")[2]
    )


def reproduce_row(name):
    from rmbert.reproduce import Row

    return Row(name)


def test_a_frozen_cls_baseline_gathers_no_candidate_tokens(tiny_encoder, planted, tmp_path):
    """NRMS over [CLS] never reads title tokens: the frozen news side skips gathering and
    standardising them for the candidates, and the scores are those with the tokens gathered."""
    from rmbert.data.mind import load_split
    from rmbert.run import load_run

    cfg = dataclasses.replace(tiny_cfg(tiny_encoder, batch_size=32), model="nrms")
    train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    run = load_run(tmp_path / "r")
    split = load_split(planted / "dev")
    batch = run.batcher(split, run.store([split], progress=False)).batch(np.arange(6))
    model = run.model.eval()
    assert model.reads_tokens == (False, False)
    gathered = []
    frozen = model.news._frozen
    model.news._frozen = lambda rows, tokens: gathered.append(tokens) or frozen(rows, tokens)
    with torch.no_grad():
        lean = model(batch)
        model.rec.needs_candidate_tokens = True
        full = model(batch)
    assert gathered == [False, False, False, True]  # history, candidates; then candidates with tokens
    torch.testing.assert_close(lean, full, rtol=0, atol=0)
    words = NRMS(NRMSConfig(dim=E, word_encoder=True))
    assert (words.needs_history_tokens, words.needs_candidate_tokens) == (True, True)
