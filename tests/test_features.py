"""News features, mean pooling, the learning-rate schedule and presets."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import write_split

from rmbert.config import PRESETS, RunConfig, TrainConfig, apply_overrides, preset
from rmbert.data.mind import load_split
from rmbert.encoders.bert import EncoderConfig, mean_pool
from rmbert.models.features import FeatureConfig, FeatureVocab, NewsFeatures
from rmbert.models.rmbert import RMBERTConfig
from rmbert.run import load_run
from rmbert.train import train


def ent(*qids: str) -> str:
    return json.dumps([{"Label": q, "Type": "P", "WikidataId": q, "Confidence": 1.0} for q in qids])


NEWS = [
    f"N1\tsports\tfootball\tKickoff today\t\turl\t{ent('Q1', 'Q2')}\t[]",
    f"N2\tsports\ttennis\tSet point\t\turl\t{ent('Q1')}\t{ent('Q3')}",
    f"N3\tfinance\tmarkets\tStocks rally\t\turl\t{ent('Q2')}\t[]",
    "N4\tfinance\tbanking\tRates rise\t\turl\t[]\t[]",
]
BEHAVIORS = ["1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0"]


def test_vocabulary_ids_unknowns_and_roundtrip(tmp_path):
    news = load_split(write_split(tmp_path / "s", NEWS, BEHAVIORS)).news
    v = FeatureVocab.fit(news, FeatureConfig(entities=True, min_count=2))
    assert v.categories == ["finance", "sports"] and v.entities == ["Q1", "Q2"]  # Q3 is in one news only
    ids = v.news_ids(news, max_entities=2)
    assert ids.tolist() == [[2, 2, 1, 2], [2, 4, 1, 0], [1, 3, 2, 0], [1, 1, 0, 0]]
    unseen = v.ids(["weather"], ["storms"], [["Q9", "Q2", "Q1"]], max_entities=2)
    assert unseen.tolist() == [[0, 0, 2, 0]]  # unknown values -> 0; only the first 2 entities are read
    v.save(tmp_path / "f.json")
    assert FeatureVocab.load(tmp_path / "f.json") == v
    (tmp_path / "bad.json").write_text('{"categories": 3')
    with pytest.raises(ValueError, match="bad.json"):
        FeatureVocab.load(tmp_path / "bad.json")


def test_feature_vector_is_the_sum_of_its_embeddings():
    cfg = FeatureConfig(
        category=True,
        subcategory=True,
        entities=True,
        max_entities=3,
        num_categories=4,
        num_subcategories=5,
        num_entities=6,
    )
    f = NewsFeatures(cfg, 8)
    ids = torch.tensor([[2, 3, 1, 5, 0], [0, 0, 0, 0, 0]])
    out = f(ids)
    want = f.cat.weight[2] + f.sub.weight[3] + (f.ent.weight[1] + f.ent.weight[5]) / 2
    assert torch.allclose(out[0], want)
    assert torch.all(out[1] == 0)  # all unknown: nothing added
    only_cat = NewsFeatures(dataclasses.replace(cfg, subcategory=False, entities=False), 8)
    assert torch.allclose(only_cat(ids)[0], only_cat.cat.weight[2])


def tiny(tiny_encoder, *overrides):
    cfg = apply_overrides(
        preset("paper"),
        [
            f"encoder.name={tiny_encoder}",
            "encoder.max_title_len=12",
            "train.epochs=1",
            "train.batch_size=8",
            "train.checkpoint_every=0",
            "rmbert.steps=2",
            *overrides,
        ],
    )
    return cfg


def test_features_train_evaluate_and_reach_the_scores(tiny_encoder, planted, tmp_path):
    cfg = tiny(tiny_encoder, "features.category=true", "features.subcategory=true", "train.max_steps=6")
    train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["features"]
    vocab = FeatureVocab.load(tmp_path / "r" / "features.json")
    assert saved["num_categories"] == len(vocab.categories) + 1 > 2
    run = load_run(tmp_path / "r")
    dev = load_split(planted / "dev")
    batcher = run.batcher(dev, run.store([dev], progress=False))
    batch = next(batcher.eval_batches(4))
    with torch.no_grad():
        got = run.model(batch)
        # the same forward with the category embedding of every news shifted changes the scores
        run.model.features.cat.weight[1:] += 1.0
        assert not torch.allclose(run.model(batch), got)
    rows = run.store([dev], progress=False).rows(dev.news.ids)
    cats = [vocab.categories.index(c) + 1 for c in dev.news.category]
    assert run.model.feature_ids[rows, 0].tolist() == cats


def test_mean_pooling_reads_the_stored_mean_of_title_tokens(tiny_encoder, planted, tmp_path):
    cfg = tiny(tiny_encoder, "encoder.pooling=mean", "train.max_steps=2")
    train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    run = load_run(tmp_path / "r")
    dev = load_split(planted / "dev")
    store = run.store([dev], progress=False)
    run.model.news.set_store(store)
    a = store.arrays
    want = mean_pool(
        torch.from_numpy(a["tokens"][1:].astype(np.float32)), torch.from_numpy(np.array(a["mask"][1:]))
    )
    assert np.allclose(a["pool"][1:].astype(np.float32), want.numpy(), atol=2e-3)
    hist, cand = run.model.news(torch.tensor([[1, 2]]), torch.tensor([[3]]))
    assert torch.allclose(hist.cls[0], torch.from_numpy(a["pool"][[1, 2]].astype(np.float32)))
    # a store written before the pool array existed computes it from the tokens when opened
    import shutil

    from rmbert.encoders.store import NewsStore

    old = tmp_path / "old-store"
    shutil.copytree(store.path, old)
    (old / "seg-00000" / "pool.npy").unlink()
    meta = json.loads((old / "meta.json").read_text())
    meta["arrays"].remove("pool")
    del meta["segment_info"]["seg-00000"]["bytes"]["pool.npy"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert np.allclose(NewsStore.open(old).pooled()[1:].astype(np.float32), want.numpy(), atol=2e-3)


def test_full_mode_mean_pooling_matches_the_frozen_store(tiny_encoder, planted, tmp_path):
    from rmbert.encoders.news import NewsSide

    cfg = tiny(tiny_encoder, "encoder.pooling=mean", "train.max_steps=1")
    train(cfg, planted / "train", tmp_path / "r", planted / "dev", progress=False)
    run = load_run(tmp_path / "r")
    dev = load_split(planted / "dev")
    frozen = run.store([dev], progress=False)
    full_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, mode="full"))
    from rmbert.assemble import store_for

    tokens = store_for(full_cfg, run.encoding, [dev], progress=False)
    side = NewsSide("full", run.encoder, tokens, pooling="mean").eval()
    rows = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        _, cand = side(rows[:, :1], rows)
    want = torch.from_numpy(
        frozen.pooled()[frozen.rows([tokens.ids[r - 1] for r in [1, 2, 3]])].astype(np.float32)
    )
    assert torch.allclose(cand.cls[0], want, atol=5e-3)


def test_learning_rate_schedule():
    const = TrainConfig()
    assert [const.lr_factor(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    lin = TrainConfig(schedule="linear", warmup=0.2)
    f = [lin.lr_factor(s, 10) for s in range(10)]
    assert f[0] == pytest.approx(0.5 * 1.0) and f[1] == pytest.approx(1.0 * 0.9)  # warm-up of 2 steps
    assert f[5] == pytest.approx(0.5) and f[9] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="cosine-ish")
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.5)


def test_paper_preset_is_the_papers_model():
    p = preset("paper")
    assert p.encoder.pooling == "cls" and not p.encoder.standardize and not p.features.any
    assert not p.rmbert.click_product and p.rmbert.query_attention == "softmax" and p.rmbert.steps == 4
    assert p.train.loss == "bce" and p.train.negatives == 0 and p.train.schedule == "constant"
    assert p.rmbert.prev_query and p.rmbert.prev_memory and p.rmbert.attention
    assert not p.rmbert.similarity and not p.rmbert.match_strength
    # the paper's model is the model dataclasses' own defaults, whatever the run defaults are
    assert p.rmbert == dataclasses.replace(RMBERTConfig(), dim=p.rmbert.dim)
    assert dataclasses.replace(p.encoder, name=RunConfig().encoder.name) == EncoderConfig()
    assert p.features == FeatureConfig()
    # from any base, every addition off (entity vectors before entities, or the check refuses)
    busy = RunConfig().override(
        {f"features.{k}": True for k in ("category", "subcategory", "entities", "entity_vectors")}
        | {"rmbert.click_product": True, "rmbert.match_strength": True, "rmbert.similarity_heads": 3}
        | {"rmbert.feature_match": True, "rmbert.content_match": True, "rmbert.wide": True}
        | {"rmbert.click_concat": False, "rmbert.field_affinity": True, "rmbert.memory_match": True}
        | {"features.init_std": 2.0}
    )
    assert preset("paper", busy) == p
    assert preset("default") == RunConfig()
    assert set(PRESETS) >= {"paper", "default"}
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")


def test_cli_preset_paper_writes_the_papers_config(tiny_encoder, planted, tmp_path, capsys):
    from rmbert.cli import main

    args = ["--quiet", "train", "--train", str(planted / "train"), "--valid", str(planted / "dev")]
    args += ["--out", str(tmp_path / "r"), "--encoder", str(tiny_encoder), "--preset", "paper"]
    args += ["--set", "train.max_steps=1", "--set", "encoder.max_title_len=12"]
    assert main(args) == 0
    saved = RunConfig.load(tmp_path / "r" / "config.json")
    assert saved.encoder.pooling == "cls" and not saved.rmbert.click_product and saved.train.batch_size == 50
    assert saved.train.max_steps == 1  # --set applies on top of the preset


def test_entity_vectors_join_the_vocabulary_and_the_news_vector(tmp_path):
    from rmbert.data.mind import MindFormatError, load_entity_vectors

    folder = write_split(tmp_path / "s", NEWS, BEHAVIORS)
    (folder / "entity_embedding.vec").write_text("Q3\t1.0\t2.0\t\nQ1\t0.5\t-1.0\nQ7\t9\t9\n")
    ids, vecs = load_entity_vectors(folder / "entity_embedding.vec")
    assert ids == ["Q3", "Q1", "Q7"] and vecs.shape == (3, 2) and vecs[0].tolist() == [1.0, 2.0]
    news = load_split(folder).news
    cfg = FeatureConfig(entities=True, entity_vectors=True, min_count=2)
    v = FeatureVocab.fit(news, cfg, folder / "entity_embedding.vec")
    assert v.entities == ["Q1", "Q2", "Q3"]  # Q3: one news, but it has a vector; Q7: in no news
    assert v.vectors.tolist() == [[0, 0], [0.5, -1.0], [0, 0], [1.0, 2.0]]
    sizes = v.sizes()
    f = NewsFeatures(dataclasses.replace(cfg, **sizes), 4)
    f.set_vectors(v.vectors)
    ids = torch.tensor([[0, 0, 1, 3, 0]])  # Q1 and Q3
    want = (
        f.ent.weight[1]
        + f.ent_proj(torch.tensor([0.5, -1.0]))
        + f.ent.weight[3]
        + f.ent_proj(torch.tensor([1.0, 2.0]))
    ) / 2
    assert torch.allclose(f(ids)[0], want)
    without = FeatureVocab.fit(news, cfg, tmp_path / "missing" / "entity_embedding.vec")
    assert without.vectors is None and without.sizes()["vector_dim"] == 0 and without.entities == ["Q1", "Q2"]
    assert NewsFeatures(dataclasses.replace(cfg, **without.sizes()), 4).ent_proj is None
    (folder / "bad.vec").write_text("Q1\t1\t2\nQ2\t1\n")
    with pytest.raises(MindFormatError, match="bad.vec:2: 1 values; expected 2"):
        load_entity_vectors(folder / "bad.vec")


def test_history_positions_count_back_from_the_most_recent_click():
    cfg = FeatureConfig(history_position=True, max_history=4)
    f = NewsFeatures(cfg, 3)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    got = f.positions(mask)
    w = f.pos.weight
    assert torch.allclose(got[0], torch.stack([w[3], w[2], w[1], w[0]]))  # oldest first, padding zero
    assert torch.allclose(got[1, 0], w[1]) and torch.all(got[2] == 0) and torch.all(w[0] == 0)


def test_gradient_accumulation_gives_the_same_weights(tiny_encoder, planted, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for acc in (1, 3):
        cfg = tiny(tiny_encoder, "train.max_steps=4", f"train.accumulate={acc}", "train.checkpoint_every=0")
        train(cfg, planted / "train", tmp_path / f"a{acc}", planted / "dev", progress=False)
        runs[acc] = load_file(str(tmp_path / f"a{acc}" / "model.safetensors"))
    shift_only = {"rec.W_alpha.bias", "rec.W_beta.bias", "rec.W_I.bias", "rec.W_H.bias"}
    for k in runs[1]:
        if k not in shift_only:
            assert torch.allclose(runs[1][k], runs[3][k], atol=1e-5), k


def test_override_and_yaml_config(tmp_path, tiny_encoder, planted, capsys):
    from rmbert.cli import main

    cfg = RunConfig().override({"train.epochs": 5, "rmbert.steps": 2, "features.category": True})
    assert cfg.train.epochs == 5 and cfg.rmbert.steps == 2 and cfg.features.category
    with pytest.raises(ValueError, match="train.epochs must be int"):
        RunConfig().override({"train.epochs": "five"})
    with pytest.raises(ValueError, match="no field 'nope'"):
        RunConfig().override({"train.nope": 1})
    (tmp_path / "run.yaml").write_text("rmbert:\n  steps: 2\ntrain:\n  batch_size: 8\n  max_steps: 2\n")
    loaded = RunConfig.from_yaml(tmp_path / "run.yaml")
    assert (
        loaded.rmbert.steps == 2
        and loaded.train.batch_size == 8
        and loaded.train.epochs == RunConfig().train.epochs
    )
    args = ["--quiet", "train", "--train", str(planted / "train"), "--valid", str(planted / "dev")]
    args += ["--encoder", str(tiny_encoder), "--config", str(tmp_path / "run.yaml")]
    assert main([*args, "--out", str(tmp_path / "r"), "--set", "encoder.max_title_len=12"]) == 0
    saved = RunConfig.load(tmp_path / "r" / "config.json")
    assert saved.rmbert.steps == 2 and saved.train.batch_size == 8
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1, 2]\n")
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r2")]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_feature_embeddings_start_at_init_std():
    """`init_std` sets the embeddings' initial scale (the default run's 0.5 is about half the
    standardised news vectors' std of 1; the model dataclass keeps 0.1); the unknown row stays 0."""
    for std in (0.1, 0.5):
        f = NewsFeatures(FeatureConfig(category=True, num_categories=3000, init_std=std), dim=64)
        w = f.cat.weight.detach()
        assert abs(float(w[1:].std()) - std) < 0.05 * std and torch.all(w[0] == 0)
    with pytest.raises(ValueError, match="features.init_std"):
        FeatureConfig(init_std=-1.0)
