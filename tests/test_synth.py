import json

import numpy as np

from rmbert.data.mind import load_split
from rmbert.data.synth import SynthConfig, synth
from rmbert.data.words import FILLERS, TOPICS


def test_deterministic_per_seed(tmp_path):
    a = synth(tmp_path / "a", SynthConfig(users=40, seed=1))
    b = synth(tmp_path / "b", SynthConfig(users=40, seed=1))
    synth(tmp_path / "c", SynthConfig(users=40, seed=2))
    for split in ("train", "dev"):
        for f in ("news.tsv", "behaviors.tsv"):
            assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes()
    assert a["oracle"] == b["oracle"]
    assert (tmp_path / "a/train/behaviors.tsv").read_bytes() != (
        tmp_path / "c/train/behaviors.tsv"
    ).read_bytes()


def test_valid_mind_format_with_planted_structure(planted):
    train, dev = load_split(planted / "train"), load_split(planted / "dev")
    assert train.impressions.missing_history_refs == 0 and train.impressions.has_labels
    # dev is later in time than every training impression
    assert dev.impressions.times.min() > train.impressions.times.max()
    # every logged impression has a click (as in MIND)
    imps = train.impressions
    clicks = np.add.reduceat(imps.labels, imps.cand_ptr[:-1])
    assert (clicks >= 1).all()
    # titles are made of real words from the vocabulary
    vocab = {w for subs in TOPICS.values() for ws in subs.values() for w in ws} | set(FILLERS)
    for t in train.news.title[:50]:
        assert set(t.lower().split()) <= vocab
    oracle = json.loads((planted / "oracle.json").read_text())["oracle"]
    assert 0.7 < oracle["dev"]["auc"] < 0.95


def test_clicks_follow_specific_history_items(tmp_path):
    """Candidates from the same story as some history item are clicked far more often."""
    synth(tmp_path / "s", SynthConfig(users=400, seed=0))
    s = load_split(tmp_path / "s" / "train")
    imps, news = s.impressions, s.news
    # The story of a news is its subcategory plus its two signature words; approximate by subcategory.
    sub = np.array([hash(x) for x in news.subcategory])
    same, other = [], []
    for i in range(len(imps)):
        h = sub[imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]]
        c = imps.cand[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
        y = imps.labels[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
        match = np.isin(sub[c], h)
        same += y[match].tolist()
        other += y[~match].tolist()
    assert np.mean(same) > 3 * np.mean(other)


def test_cli_synth_takes_every_generator(tmp_path, capsys):
    from rmbert.cli import main

    for gen in ("story", "entity", "drift", "novelty"):
        assert (
            main(["--quiet", "data", "synth", str(tmp_path / gen), "--users", "60", "--generator", gen]) == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert out["generator"] == gen and 0.5 < out["oracle"]["dev"]["auc"] <= 1
        assert (tmp_path / gen / "train" / "news.tsv").is_file()
    assert (tmp_path / "entity" / "train" / "entity_embedding.vec").is_file()
    assert main(["--quiet", "data", "synth", str(tmp_path / "x"), "--users", "0"]) == 2
