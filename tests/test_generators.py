"""The planted generators of rmbert.data.generators: MIND format, determinism, and planted mechanisms
measured on the written files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from rmbert.data import words as W
from rmbert.data.generators import GENERATORS, users_for
from rmbert.data.mind import Split, load_split

NEW = ["entity", "drift", "novelty"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Each generator at a size where its mechanism is measurable (about 4k training impressions)."""
    out = {}
    for name in NEW:
        d = tmp_path_factory.mktemp(name)
        GENERATORS[name](d, 1400, 0)
        out[name] = d
    return out


def _rows(split: Split):
    imps = split.impressions
    for i in range(len(imps)):
        a, b = imps.cand_ptr[i], imps.cand_ptr[i + 1]
        yield imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]], imps.cand[a:b], imps.labels[a:b]


def _ctr(y: list[int]) -> float:
    assert len(y) > 30, "too few candidates to measure"
    return float(np.mean(y))


@pytest.mark.parametrize("name", [*NEW, "story"])
def test_valid_mind_files(tmp_path, name):
    meta = GENERATORS[name](tmp_path, 60, 1)
    train, dev = load_split(tmp_path / "train"), load_split(tmp_path / "dev")
    for s in (train, dev):
        imps = s.impressions
        assert len(imps) > 0 and imps.has_labels
        assert imps.missing_history_refs == 0 and not imps.missing_candidate_ids
        clicks = np.add.reduceat(imps.labels, imps.cand_ptr[:-1])
        assert (clicks >= 1).all()  # MIND logs only impressions with a click
        sizes = np.diff(imps.cand_ptr)
        assert sizes.min() >= 5 and sizes.max() <= 40
        assert all(t.strip() and "\t" not in t for t in s.news.title)
    assert dev.impressions.times.min() > train.impressions.times.max()
    # dev shows fresh news that the train split has never seen ("story" lists all news in both)
    fresh = {dev.news.ids[n] for n in dev.impressions.cand.tolist()} - set(
        train.news.ids[n] for n in train.impressions.cand.tolist()
    )
    assert fresh
    if name != "story":
        assert fresh & (set(dev.news.ids) - set(train.news.ids))
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    assert oracle["generator"] == name and oracle == json.loads(json.dumps(meta))
    assert {"generator", "config", "oracle", "news"} <= set(oracle)
    for split in ("train", "dev"):
        assert {"auc", "mrr", "ndcg@5", "ndcg@10"} <= set(oracle["oracle"][split])
    assert oracle["config"]["users"] == 60 and oracle["config"]["seed"] == 1


@pytest.mark.parametrize("name", NEW)
def test_deterministic_per_seed(tmp_path, name):
    a = GENERATORS[name](tmp_path / "a", 50, 4)
    b = GENERATORS[name](tmp_path / "b", 50, 4)
    GENERATORS[name](tmp_path / "c", 50, 5)
    files = ["train/news.tsv", "train/behaviors.tsv", "dev/news.tsv", "dev/behaviors.tsv"]
    if name == "entity":
        files += ["train/entity_embedding.vec", "dev/entity_embedding.vec"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a == b
    assert (tmp_path / "a/train/behaviors.tsv").read_bytes() != (
        tmp_path / "c/train/behaviors.tsv"
    ).read_bytes()


@pytest.mark.parametrize("name", NEW)
def test_mind_like_shape(made, name):
    train = load_split(made[name] / "train")
    imps = train.impressions
    ctr = imps.labels.mean()
    assert 0.04 <= ctr <= 0.11
    assert 0 < imps.empty_histories < 0.1 * len(imps)
    oracle = json.loads((made[name] / "oracle.json").read_text())["oracle"]["dev"]["auc"]
    assert 0.75 <= oracle <= 0.9
    # users_for is calibrated: about 3 training impressions per user
    assert abs(users_for(name, len(imps)) - 1400) < 0.15 * 1400
    assert abs(len(load_split(made[name] / "dev").impressions) / 1400 - 1.0) < 0.15


def _news_entities(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for line in (folder / "news.tsv").read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        ents = json.loads(cols[6])
        assert json.loads(cols[7]) is not None
        out[cols[0]] = ents
        for e in ents:  # MIND's entity JSON: offsets point at the surface forms in the title
            assert set(e) == {
                "Label",
                "Type",
                "WikidataId",
                "Confidence",
                "OccurrenceOffsets",
                "SurfaceForms",
            }
            assert re.fullmatch(r"Q\d+", e["WikidataId"]) and e["Type"] in {"P", "O", "G"}
            for off, form in zip(e["OccurrenceOffsets"], e["SurfaceForms"]):
                assert cols[3][off : off + len(form)] == form
    return out


def _embeddings(folder: Path) -> dict[str, np.ndarray]:
    vec = {}
    for line in (folder / "entity_embedding.vec").read_text().splitlines():
        parts = line.split("\t")
        assert len(parts) == 101
        vec[parts[0]] = np.array(parts[1:], dtype=float)
    return vec


def test_entity_json_and_embeddings(made):
    for split in ("train", "dev"):
        ents = _news_entities(made["entity"] / split)
        vec = _embeddings(made["entity"] / split)
        used = {e["WikidataId"] for es in ents.values() for e in es}
        assert used and used <= set(vec)
        assert all(1 <= len(es) <= 3 for es in ents.values())


def test_entity_clicks_follow_entities_of_history_items(made):
    d = made["entity"]
    split = load_split(d / "train")
    ents = _news_entities(d / "train")
    qid = [{e["WikidataId"] for e in ents[n]} for n in split.news.ids]
    truth = json.loads((d / "oracle.json").read_text())["truth"]["entity_clusters"]
    cluster = {q: k for k, members in enumerate(truth) for q in members}
    clus = [{cluster[q] for q in qs} for qs in qid]
    same, related, other = [], [], []
    for h, c, y in _rows(split):
        hq = set().union(*(qid[j] for j in h)) if len(h) else set()
        hc = set().union(*(clus[j] for j in h)) if len(h) else set()
        for n, label in zip(c.tolist(), y.tolist()):
            if qid[n] & hq:
                same.append(label)
            elif clus[n] & hc:
                related.append(label)
            else:
                other.append(label)
    assert _ctr(same) > 2.0 * _ctr(other)
    assert _ctr(related) > 2.0 * _ctr(other)  # related entities: different names, same hidden cluster
    # the embeddings reflect the hidden graph, noisily
    vec = _embeddings(d / "train")
    unit = {q: v / np.linalg.norm(v) for q, v in vec.items()}
    rng = np.random.default_rng(0)
    pairs_in = [m for m in truth if len(m) > 1 and all(q in unit for q in m[:2])][:200]
    cos_in = np.mean([unit[m[0]] @ unit[m[1]] for m in pairs_in])
    qs = list(unit)
    rand = rng.choice(len(qs), (400, 2))
    cos_out = np.mean([unit[qs[a]] @ unit[qs[b]] for a, b in rand if cluster[qs[a]] != cluster[qs[b]]])
    assert cos_in > cos_out + 0.15


def test_entity_category_affinity_is_per_user(made):
    """Candidates of a category frequent in the user's history are clicked more, beyond its global CTR."""
    split = load_split(made["entity"] / "train")
    cat = split.news.category
    top, rest = [], []
    for h, c, y in _rows(split):
        if len(h) < 5:
            continue
        counts: dict[str, int] = {}
        for j in h.tolist():
            counts[cat[j]] = counts.get(cat[j], 0) + 1
        best = max(counts, key=counts.get)
        for n, label in zip(c.tolist(), y.tolist()):
            (top if cat[n] == best else rest).append(label)
    assert _ctr(top) > 2.0 * _ctr(rest)


def test_drift_recent_history_matters_more(made):
    split = load_split(made["drift"] / "train")
    sub = split.news.subcategory
    recent, old = [], []
    for h, c, y in _rows(split):
        if len(h) < 16:
            continue
        last = {sub[j] for j in h[-3:].tolist()}
        first = {sub[j] for j in h[: len(h) // 2].tolist()} - {sub[j] for j in h[-8:].tolist()}
        for n, label in zip(c.tolist(), y.tolist()):
            if sub[n] in last:
                recent.append(label)
            elif sub[n] in first:
                old.append(label)
    assert _ctr(recent) > 2.0 * _ctr(old)


def test_drift_two_hop_and_popularity(made):
    d = made["drift"]
    split = load_split(d / "train")
    f = json.loads((d / "oracle.json").read_text())["truth"]["twohop"]
    sub = split.news.subcategory
    hop, other = [], []
    for h, c, y in _rows(split):
        mine = {sub[j] for j in h.tolist()}
        hops = {f[s] for s in (sub[j] for j in h[-5:].tolist())} - mine
        for n, label in zip(c.tolist(), y.tolist()):
            if sub[n] in hops:
                hop.append(label)
            elif sub[n] not in mine:
                other.append(label)
    assert _ctr(hop) > 2.0 * _ctr(other)
    # hook words make a title more popular with everyone
    hooked = np.array([t.split()[0].lower() in W.HOOKS for t in split.news.title])
    imps = split.impressions
    assert imps.labels[hooked[imps.cand]].mean() > 1.3 * imps.labels[~hooked[imps.cand]].mean()


def _story(title: str) -> tuple[str, int]:
    """(story key, kind) of a "novelty" title: 0 plain, 1 update ("Breaking: ..."), 2 explainer."""
    kind = 0
    head, _, rest = title.partition(": ")
    if rest and head.lower() in W.UPDATE_MARKERS:
        title, kind = rest, 1
    elif rest and rest in W.EXPLAINER_MARKERS:
        title, kind = head, 2
    return " ".join(title.split()[:2]).lower(), kind


def test_novelty_fatigue_updates_and_explainers(made):
    split = load_split(made["novelty"] / "train")
    story, kind = zip(*(_story(t) for t in split.news.title))
    sub = split.news.subcategory
    ctr: dict[tuple[bool, int], list[int]] = {(s, k): [] for s in (True, False) for k in range(3)}
    for h, c, y in _rows(split):
        read = {story[j] for j in h.tolist()}
        mine = {sub[j] for j in h.tolist()}
        for n, label in zip(c.tolist(), y.tolist()):
            if sub[n] in mine:  # on the user's topics: did they already read this story?
                ctr[(story[n] in read, kind[n])].append(label)
    assert _ctr(ctr[(True, 0)]) < 0.7 * _ctr(ctr[(False, 0)])  # fatigue
    assert _ctr(ctr[(True, 1)]) > 2.0 * _ctr(ctr[(True, 0)])  # updates are welcome
    assert _ctr(ctr[(True, 2)]) < 0.5 * _ctr(ctr[(False, 2)])  # explainers bore who read the story


def test_users_for():
    assert users_for("entity", 3000) == pytest.approx(1000, rel=0.1)
    assert users_for("story", 30_000) == pytest.approx(10_000, rel=0.1)
    with pytest.raises(KeyError):
        users_for("nope", 10)
