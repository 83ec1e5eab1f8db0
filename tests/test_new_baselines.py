"""DeepFM, DCN, DKN, FIM and NAML: the side-input plumbing, shapes, masks, empty histories,
unknown users, save/load, and that each learns planted data better than the category CTR."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import assert_encoded_once_as_each_slot, write_split

from rmbert.config import apply_overrides, preset
from rmbert.data.mind import load_split
from rmbert.metrics import mind_metrics
from rmbert.models.dcn import DCN, DCNConfig
from rmbert.models.deepfm import DeepFM, DeepFMConfig
from rmbert.models.dkn import DKN, DKNConfig
from rmbert.models.fim import FIM, FIMConfig
from rmbert.models.naml import NAML, NAMLConfig
from rmbert.models.tables import align_entities
from rmbert.run import load_run
from rmbert.train import train
from rmbert.types import NewsRepr

B, C, M, L, E, A, V = 3, 4, 6, 5, 16, 7, 40  # V: WordPiece ids, A: abstract tokens
NEW = ("deepfm", "dcn", "dkn", "fim", "naml")


def side(g, K, mask, amask):
    """Side tables of K news per user, consistent with the title mask (0 = padding)."""
    return {
        "title_ids": torch.randint(1, V, (B, K, L), generator=g) * mask,
        "title_entity": torch.randint(0, 5, (B, K, L), generator=g) * mask,
        "news_id": torch.randint(0, 6, (B, K), generator=g),
        "category": torch.randint(0, 4, (B, K), generator=g),
        "subcategory": torch.randint(0, 5, (B, K), generator=g),
        "abstract": torch.randn(B, K, A, E, generator=g) * amask[..., None],  # embedded by the news side
        "abstract_mask": amask,
    }


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hm = torch.rand(B, M, generator=g) > 0.3
    hm[:, 0] = True
    hm[2] = False  # an empty history

    def news(K):
        tm = torch.rand(B, K, L, generator=g) > 0.3
        tm[..., 0] = True
        am = torch.rand(B, K, A, generator=g) > 0.4
        am[0, 0] = False  # an empty abstract
        tok = torch.randn(B, K, L, E, generator=g) * tm[..., None]
        return NewsRepr(torch.randn(B, K, E, generator=g), tok, tm, extra=side(g, K, tm, am))

    return news(M), hm, news(C)


def models(**over):
    ids = dict(num_users=5, num_news=6, num_categories=4, num_subcategories=5, vocab_size=V)
    return [
        DeepFM(DeepFMConfig(dim=E, field_dim=4, hidden=8, layers=2, **ids, **over.get("deepfm", {}))),
        DCN(DCNConfig(dim=E, field_dim=4, hidden=8, cross=2, **ids, **over.get("dcn", {}))),
        DKN(DKNConfig(dim=E, filters=4, windows=3, hidden=8, entity_dim=4, num_entities=5)),
        DKN(DKNConfig(dim=E, filters=4, windows=2, hidden=8, num_entities=5, vector_dim=3)),
        FIM(FIMConfig(dim=E, filters=8, channels=4, max_history=M + 3, title_len=L)),
        FIM(FIMConfig(dim=E, filters=8, channels=4, max_history=M + 3, title_len=L, embedding_level=False)),
        NAML(
            NAMLConfig(dim=E, filters=8, query_dim=8, category_dim=4, num_categories=4, num_subcategories=5)
        ),
    ]


def pad_history(hist: NewsRepr, hm: torch.Tensor, n: int, fill: float = 7.0):
    """n more history slots, masked, holding garbage everywhere (ids too)."""

    def grow(t):
        value = fill if t.is_floating_point() else True if t.dtype == torch.bool else 3  # 3: a valid id
        return torch.cat([t, torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype)], 1)

    ex = {k: grow(v) for k, v in hist.extra.items()}
    grown = NewsRepr(grow(hist.cls), grow(hist.tokens), grow(hist.mask), extra=ex)
    return grown, torch.cat([hm, torch.zeros(B, n, dtype=torch.bool)], 1)


def noisy(news: NewsRepr, slot_mask: torch.Tensor | None = None) -> NewsRepr:
    """Garbage wherever the news is padding: masked tokens; with slot_mask [B, K], whole masked slots."""
    keep_tok = (
        news.mask[..., None] if slot_mask is None else news.mask[..., None] & slot_mask[..., None, None]
    )
    ex = dict(news.extra)
    ex["abstract"] = torch.where(ex["abstract_mask"][..., None], ex["abstract"], 55.0)
    if slot_mask is not None:  # a masked slot's ids can be anything
        for k in ("news_id", "category", "subcategory"):
            ex[k] = torch.where(slot_mask, ex[k], 3)
        for k in ("title_ids", "title_entity"):
            ex[k] = torch.where(slot_mask[..., None], ex[k], 2)
        ex["abstract"] = torch.where(slot_mask[..., None, None], ex["abstract"], -9.0)
    cls = news.cls if slot_mask is None else torch.where(slot_mask[..., None], news.cls, 99.0)
    return NewsRepr(cls, torch.where(keep_tok, news.tokens, 99.0), news.mask, extra=ex)


def test_shapes_masks_padding_and_empty_histories():
    torch.manual_seed(0)
    hist, hm, cand = inputs()
    users = torch.tensor([1, 0, 3])
    for m in models():
        m.eval()
        y = m(hist, hm, cand, users)
        assert y.shape == (B, C) and torch.isfinite(y).all(), m.name
        # garbage in padded tokens, padded history slots and padded abstract tokens changes nothing
        same = m(noisy(hist, hm), hm, noisy(cand), users)
        assert torch.allclose(same, y, atol=1e-5), m.name
        # nor do more (masked) history slots
        h2, hm2 = pad_history(hist, hm, 3)
        assert torch.allclose(m(h2, hm2, cand, users), y, atol=1e-5), m.name
        # a candidate's score does not depend on the other candidates (padded columns change nothing)
        ex = {k: v[:, :2] for k, v in cand.extra.items()}
        sub = NewsRepr(cand.cls[:, :2], cand.tokens[:, :2], cand.mask[:, :2], extra=ex)
        assert torch.allclose(m(hist, hm, sub, users), y[:, :2], atol=1e-5), m.name


def test_empty_history_scores_are_finite_and_history_free():
    hist, hm, cand = inputs(1)
    for m in models():
        m.eval()
        users = torch.tensor([1, 2, 0])
        y = m(hist, hm, cand, users)
        y2 = m(inputs(2)[0], hm, cand, users)  # other clicked news; user 2's are all masked
        assert torch.isfinite(y[2]).all() and torch.allclose(y[2], y2[2], atol=1e-5), m.name


def test_unknown_users_read_the_learned_unknown_embedding():
    hist, hm, cand = inputs(3)
    for m in models()[:2]:  # DeepFM, DCN: user-id fields
        m.eval()
        unknown = m(hist, hm, cand, torch.zeros(B, dtype=torch.long))
        assert torch.allclose(m(hist, hm, cand, None), unknown)  # no ids at all: unknown users
        assert torch.allclose(m(hist, hm, cand, torch.tensor([99, 6, 0])), unknown)  # past the table
        assert not torch.allclose(m(hist, hm, cand, torch.tensor([1, 2, 3])), unknown)
        # training replaces ids by 0 at rate id_dropout: the unknown row is trained
        m2 = type(m)(dataclasses.replace(m.cfg, id_dropout=1.0)).train()
        m2(hist, hm, cand, torch.tensor([1, 2, 3])).sum().backward()
        grad = m2.fields.emb["user"].weight.grad
        assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    for m in models()[2:]:  # DKN, FIM, NAML read no user ids
        m.eval()
        y = m(hist, hm, cand, torch.tensor([1, 2, 3]))
        assert torch.equal(y, m(hist, hm, cand, torch.tensor([0, 0, 0]))) and torch.equal(
            y, m(hist, hm, cand)
        )


def test_tfidf_weights():
    m = DeepFM(DeepFMConfig(dim=E, field_dim=4, vocab_size=10, num_users=1, num_news=1))
    titles = np.array([[3, 4, 0], [3, 5, 5], [6, 0, 0]])  # 3 training news
    m.fit_training_news(None, {"title_ids": titles})
    idf = lambda df: np.log(4 / (1 + df)) + 1  # noqa: E731
    assert np.allclose(m.fields.idf[[3, 4, 5, 7]].numpy(), [idf(2), idf(1), idf(1), idf(0)])
    w = m.fields.tfidf(torch.tensor([[3, 5, 5, 0]]))[0].numpy()
    tf_idf = np.array([idf(2) / 3, 2 * idf(1) / 3])  # token 3 once, token 5 twice, of 3 tokens
    want = tf_idf / np.linalg.norm(tf_idf)
    assert np.allclose([w[0], w[1] + w[2]], want) and w[1] == w[2] and w[3] == 0
    assert np.all(m.fields.tfidf(torch.zeros(1, 4, dtype=torch.long)).numpy() == 0)  # the null news


def test_entity_alignment_by_offsets_and_by_surface_forms():
    title = np.array([5, 6, 7, 8, 0, 0])
    spans = np.array([[0, 3], [4, 9], [10, 14], [15, 20], [0, 0], [0, 0]])
    # by offsets: characters 4..14 are tokens 1 and 2; the second link names token 2 too (first wins)
    links = [(3, [([], 4, 14)]), (4, [([7, 8], 10, 20)])]
    assert align_entities(title, spans, links).tolist() == [0, 3, 3, 4, 0, 0]
    # without spans, by the form's WordPiece sequence; forms with [UNK] are not searched (left empty)
    assert align_entities(title, None, [(2, [([7, 8], -1, -1)]), (9, [([], 0, 5)])]).tolist() == [
        0,
        0,
        2,
        2,
        0,
        0,
    ]
    assert align_entities(title, None, [(0, [([5], -1, -1)])]).tolist() == [0] * 6  # unknown entity


def ent_json(*items):
    return json.dumps(
        [
            {
                "Label": q,
                "Type": "P",
                "WikidataId": q,
                "Confidence": 1.0,
                "OccurrenceOffsets": o,
                "SurfaceForms": f,
            }
            for q, o, f in items
        ]
    )


def test_mind_parses_surface_forms_and_offsets(tmp_path):
    news = [
        f"N1\tsports\tfootball\tSoccer today\t\turl\t{ent_json(('Q1', [0], ['Soccer']))}\t[]",
        f"N2\tsports\ttennis\tA tennis match\t\turl\t{ent_json(('Q2', [], ['tennis match']))}\t[]",
        'N3\tsports\ttennis\tNo forms\t\turl\t[{"Label": "Q3 label", "WikidataId": "Q3"}]\t[]',
    ]
    split = load_split(write_split(tmp_path / "s", news, ["1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1"]))
    t = split.news.title_entities
    assert t.mentions(0) == [("Q1", (("Soccer", 0),))]
    assert t.mentions(1) == [("Q2", (("tennis match", -1),))]  # offsets and forms disagree: no offsets
    assert t.mentions(2) == [("Q3", (("Q3 label", -1),))]


def test_every_model_is_servable_and_word_inputs_need_the_embedding():
    from rmbert.models.nrms import NRMS, NRMSConfig

    assert NRMS(NRMSConfig(dim=E, heads=2, head_dim=4, query_dim=8)).servable
    embed = torch.nn.Embedding(V, E, padding_idx=0)
    for m in models():
        assert m.servable
        if m.word_inputs:  # NAML's abstract: token ids, embedded as the news side embeds them
            with pytest.raises(ValueError, match="embed_words"):
                m.inference_form()
        form = m.inference_form(embed_words=embed)
        assert form.side_tables == m.side_inputs and form.history_tokens == m.needs_history_tokens
        assert all(form.token_axes[k] == int(k in ("title_ids", "title_entity")) for k in m.side_inputs)
    m = models()[0]
    m.servable = False
    with pytest.raises(ValueError, match="cannot be served"):
        m.inference_form()


def test_cli_reproduce_and_config_know_the_models():
    from rmbert.cli import build_parser
    from rmbert.config import RunConfig
    from rmbert.reproduce import GRIDS, run_config

    for name in NEW:
        a = build_parser().parse_args(["train", "--train", "t", "--out", "o", "--model", name])
        assert a.model == name and RunConfig(model=name).model == name
    rows = {r.name: r for r in GRIDS["table1"]}
    for name in ("DeepFM", "DCN", "DKN", "FIM", "NAML"):
        assert rows[name].mode == "words" and rows[name].preset == "paper"
    assert rows["NAML"].paper is None and rows["DKN"].paper == "DKN"
    assert run_config([], rows["FIM"], 0).train.negatives == 4


# -- trained end to end on planted data ------------------------------------------------------------

# per model: training settings that learn in seconds on the tiny encoder (each model's own
# section shrunk; 4 sampled negatives and softmax, the NRMS/FIM objective), and the AUC margin
# over the category-CTR baseline it must clear
SETTINGS = {
    "deepfm": (
        ["deepfm.field_dim=8", "deepfm.hidden=32", "deepfm.layers=2", "deepfm.dropout=0.1", "train.epochs=2"],
        0.05,
    ),
    "dcn": (
        ["dcn.field_dim=8", "dcn.hidden=64", "dcn.dropout=0.1", "train.epochs=3", "train.lr=5e-3"],
        0.025,
    ),
    "dkn": (
        [
            "dkn.filters=16",
            "dkn.windows=3",
            "dkn.hidden=32",
            "dkn.entity_dim=8",
            "dkn.dropout=0",
            "train.epochs=4",
            "train.encoder_lr=3e-2",
        ],
        0.025,
    ),
    "fim": (
        ["fim.filters=16", "fim.channels=8", "fim.dropout=0", "train.epochs=2", "train.max_history=10"],
        0.05,
    ),
    "naml": (
        [
            "naml.filters=32",
            "naml.query_dim=16",
            "naml.category_dim=16",
            "naml.abstract_len=16",
            "train.epochs=2",
        ],
        0.08,
    ),
}


def learn_cfg(tiny_encoder, model, *more):
    return apply_overrides(
        preset("paper"),
        [
            f"model={model}",
            f"encoder.name={tiny_encoder}",
            "encoder.mode=words",
            "encoder.max_title_len=12",
            "train.batch_size=32",
            "train.lr=3e-3",
            "train.encoder_lr=1e-3",
            "train.max_history=20",
            "train.negatives=4",
            "train.loss=softmax",
            "train.checkpoint_every=0",
            *SETTINGS[model][0],
            *more,
        ],
    )


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Planted "story" data with 300 users, and the category-CTR baseline's dev AUC on it."""
    from rmbert.data.synth import SynthConfig, synth

    out = tmp_path_factory.mktemp("story300")
    synth(out, SynthConfig(users=300, seed=3))
    tr, dv = load_split(out / "train"), load_split(out / "dev")
    imps = tr.impressions
    cats = np.array(tr.news.category)[imps.cand]
    ctr = {c: imps.labels[cats == c].mean() for c in set(cats.tolist())}
    di = dv.impressions
    s = np.array([ctr.get(dv.news.category[i], 0.0) for i in di.cand], np.float32)
    return out, mind_metrics(di.labels, s, di.cand_ptr)["auc"]


@pytest.fixture(scope="module")
def trained(story, tiny_encoder, tmp_path_factory):
    """Each model trained once (on first use) into its own run folder: {model: (run, result)}."""
    runs: dict = {}

    def get(model):
        if model not in runs:
            out = tmp_path_factory.mktemp(model) / "run"
            r = train(
                learn_cfg(tiny_encoder, model), story[0] / "train", out, story[0] / "dev", progress=False
            )
            runs[model] = (out, r)
        return runs[model]

    return get


@pytest.mark.parametrize("model", NEW)
def test_learns_planted_data_better_than_category_ctr(model, story, trained):
    _, r = trained(model)
    ctr = story[1]
    print(
        f"\n{model}: dev auc {r['valid']['auc']:.4f} vs category ctr {ctr:.4f}, {r['train_samples_per_s']} samples/s"
    )
    assert r["valid"]["auc"] > ctr + SETTINGS[model][1], (r["valid"]["auc"], ctr)


@pytest.mark.parametrize("model", NEW)
def test_save_load_round_trip(model, story, trained):
    """A loaded run rebuilds its side tables for a split and scores exactly as validation did."""
    from rmbert.evaluate import evaluate_scores, score_impressions

    out, r = trained(model)
    run = load_run(out)
    dev = load_split(story[0] / "dev")
    batcher = run.batcher(dev, run.store([dev], progress=False))
    got = evaluate_scores(batcher, score_impressions(run.model, batcher, 64))
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert got[k] == pytest.approx(r["valid"][k], abs=1e-6), k
    assert set(run.model.side) == set(run.model.rec.side_inputs)
    if model in ("deepfm", "dcn"):  # the IDF was fitted on the training news and saved
        idf = run.model.rec.fields.idf
        assert idf.min() >= 1.0 and idf.max() > idf.min() and len(idf) == run.cfg.deepfm.vocab_size
        assert (out / "features.json").is_file() and json.loads((out / "features.json").read_text())["news"]


@pytest.mark.parametrize("model", ["dkn", "fim", "naml"])
def test_each_distinct_news_is_encoded_once_with_the_same_result(model, story, trained):
    assert_encoded_once_as_each_slot(trained(model)[0], story[0] / "dev")


def test_side_tables_of_a_split(story, trained):
    """NAML's abstract and category tables, built for the dev split with the run's tokenizer."""
    out, _ = trained("naml")
    run = load_run(out)
    dev = load_split(story[0] / "dev")
    store = run.store([dev], progress=False)
    run.batcher(dev, store)
    rows = store.rows(dev.news.ids)
    side = run.model.side
    i = 5
    want = run.tokenizer(dev.news.abstract[i], add_special_tokens=False)["input_ids"][:16]
    got = side["abstract"][rows[i]].tolist()
    assert got[: len(want)] == want and all(t == 0 for t in got[len(want) :])
    assert side["category"][rows[i]] == run.vocab.categories.index(dev.news.category[i]) + 1
    assert side["abstract"][0].sum() == 0 and side["category"][0] == 0  # the null news


def test_dkn_records_which_entity_vectors_it_used(tiny_encoder, tmp_path):
    """entity_embedding.vec when the training split has one (vectors saved with the weights),
    learned entity embeddings otherwise; the run's config says which."""
    from rmbert.data.generators import GENERATORS
    from rmbert.data.mind import load_entity_vectors

    data = tmp_path / "ent"
    GENERATORS["entity"](data, 60, 0)
    cfg = learn_cfg(tiny_encoder, "dkn", "train.max_steps=2", "train.epochs=1")
    train(cfg, data / "train", tmp_path / "r", data / "dev", progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["dkn"]
    assert saved["entity_source"] == "entity_embedding.vec" and saved["vector_dim"] == 100
    run = load_run(tmp_path / "r")
    ids, vecs = load_entity_vectors(data / "train" / "entity_embedding.vec")
    e = run.vocab.entities.index(ids[0]) + 1
    assert torch.allclose(run.model.rec.ent_vec[e], torch.from_numpy(vecs[0]))
    dev = load_split(data / "dev")
    run.batcher(dev, run.store([dev], progress=False))
    assert (run.model.side["title_entity"] > 0).any()  # dev titles' entities are aligned to tokens

    (data / "train" / "entity_embedding.vec").unlink()
    train(cfg, data / "train", tmp_path / "r2", data / "dev", progress=False)
    saved = json.loads((tmp_path / "r2" / "config.json").read_text())["dkn"]
    assert saved["entity_source"] == "learned" and saved["vector_dim"] == 0


def test_old_models_keep_their_tables(tiny_encoder, planted):
    """Models without side inputs get the feature ids array (or None) as before."""
    from rmbert.assemble import feature_ids
    from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
    from rmbert.encoders.store import Encoding, cached_store
    from rmbert.models.features import FeatureConfig, FeatureVocab

    split = load_split(planted / "dev")
    enc = Encoding.of(
        BertNewsEncoder.from_pretrained(str(tiny_encoder), 12), load_tokenizer(str(tiny_encoder))
    )
    store = cached_store(split.news.ids, split.news.title, enc, progress=False)
    cfg = apply_overrides(preset("paper"), [f"encoder.name={tiny_encoder}", "encoder.max_title_len=12"])
    assert feature_ids(cfg, None, store, [split]) is None
    vocab = FeatureVocab.fit(split.news, FeatureConfig(vocab=True))
    tables = feature_ids(cfg.override({"model": "naml"}), vocab, store, [split])
    assert tables["features"] is None and tables["category"].shape == (len(store) + 1,)
    with pytest.raises(ValueError, match="vocabulary"):
        feature_ids(cfg.override({"model": "naml"}), None, store, [split])


def test_match_table_is_the_same_in_training_and_serving(tiny_encoder, tmp_path):
    """RMBERT's `match` side table (feature_match): hashed category, subcategory and distinct
    entities per store row, built alike from a split (training, evaluation) and from the news
    metadata that serving keeps; the hash is stable across processes (not Python's salted hash)."""
    from rmbert.assemble import feature_ids
    from rmbert.data.generators import GENERATORS
    from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
    from rmbert.encoders.store import Encoding, cached_store
    from rmbert.models.tables import ServingSource, match_ids, match_key, serving_tables

    GENERATORS["entity"](tmp_path / "ent", 60, 0)
    split = load_split(tmp_path / "ent" / "dev")
    enc = Encoding.of(
        BertNewsEncoder.from_pretrained(str(tiny_encoder), 12), load_tokenizer(str(tiny_encoder))
    )
    store = cached_store(split.news.ids, split.news.title, enc, progress=False)
    cfg = apply_overrides(
        preset("paper"),
        [f"encoder.name={tiny_encoder}", "rmbert.feature_match=true", "features.max_entities=3"],
    )
    m = feature_ids(cfg, None, store, [split])["match"]  # no vocabulary needed
    assert m.shape == (len(store) + 1, 5) and (m[0] == 0).all()
    rows = store.rows(split.news.ids)
    news = split.news
    info = [
        {"category": news.category[i], "subcategory": news.subcategory[i], "entities": news.entities(i)}
        for i in range(len(news))
    ]
    arrays = store.arrays
    src = ServingSource(list(news.ids), info, arrays["input_ids"][rows], arrays["attn"][rows])
    assert np.array_equal(serving_tables(("match",), src, match_width=5)["match"], m[rows])
    assert len(set(m[rows, 0])) == len(set(news.category)) and (m[rows, :2] > 0).all()
    assert (m[rows, 2] > 0).mean() > 0.5  # most of these news name entities
    assert match_key("c", "news") == 13767213453789578 and match_key("c", "") == 0
    assert match_key("c", "x") != match_key("s", "x")
    assert list(match_ids("a", "", ["Q1", "Q1", "", "Q2", "Q3"], 4)) == [
        match_key("c", "a"),
        0,
        match_key("e", "Q1"),
        match_key("e", "Q2"),
    ]
    with pytest.raises(ValueError, match="abstract"):
        serving_tables(("abstract",), src)


def served_as_evaluated(tiny_encoder, model, data, tmp_path):
    """Train `model` over frozen vectors on data/train for a few steps, `rmbert encode` data/dev's
    news into a store, and return (the serving app, the dev split, evaluation's scores of dev
    with every user unknown, as serving sees them)."""
    from rmbert.cli import main
    from rmbert.evaluate import score_impressions
    from rmbert.serve.app import Limits, create_app
    from rmbert.serve.retrieval import RetrievalConfig

    cfg = learn_cfg(tiny_encoder, model, "encoder.mode=frozen", "train.epochs=1", "train.max_steps=6")
    train(cfg, data / "train", tmp_path / "run", progress=False)
    news = str(data / "dev" / "news.tsv")
    assert (
        main(["--quiet", "encode", str(tmp_path / "run"), "--news", news, "--out", str(tmp_path / "store")])
        == 0
    )
    run = load_run(tmp_path / "run")
    run.user_index = {}
    dev = load_split(data / "dev")
    scores = score_impressions(run.model, run.batcher(dev, run.store([dev], progress=False)))
    app = create_app(
        tmp_path / "run",
        tmp_path / "store",
        limits=Limits(retrieval=RetrievalConfig(top_n=0), max_candidates=400),
    )
    return app, dev, scores


def assert_ranks_as_evaluated(client, dev, scores, impressions: int = 4) -> list[str]:
    """/rank of the first dev impressions (last 20 clicks, every candidate) gives evaluation's
    scores; returns the last history asked."""
    imps, ids = dev.impressions, dev.news.ids
    for i in range(impressions):
        hist = [ids[j] for j in imps.hist[imps.hist_ptr[i] : imps.hist_ptr[i + 1]]][-20:]
        cands = [ids[j] for j in imps.cand[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]]
        r = client.post("/rank", json={"history": hist, "candidates": cands, "top_k": 400})
        assert r.status_code == 200, r.text
        got = {x["id"]: x["score"] for x in r.json()["ranked"]}
        want = scores[imps.cand_ptr[i] : imps.cand_ptr[i + 1]]
        assert np.allclose([got[k] for k in cands], want, rtol=0, atol=1e-5)
    return hist


@pytest.mark.parametrize("model", ["deepfm", "dcn", "fim"])
def test_served_baselines_score_as_they_evaluate_an_unknown_user(model, story, tiny_encoder, tmp_path):
    """DeepFM and DCN over frozen vectors are served with their side tables built from the news
    ids, metadata and the store's token ids, FIM with the clicked news' title tokens, and each
    scores exactly as evaluation does for a user not seen in training (serving knows no user
    ids); a request without candidates ranks too."""
    from fastapi.testclient import TestClient

    app, dev, scores = served_as_evaluated(tiny_encoder, model, story[0], tmp_path)
    with TestClient(app) as c:
        hist = assert_ranks_as_evaluated(c, dev, scores)
        r = c.post("/rank", json={"history": hist, "candidates": None, "top_k": 5})
        assert r.status_code == 200 and len(r.json()["ranked"]) == 5


def test_content_match_tables_are_the_same_in_training_and_serving(tiny_encoder, tmp_path):
    """content_match's side tables, `title_ids` and `entity_ids` (the feature vocabulary's entity
    ids, as the feature ids hold them), built alike from a split and from what serving keeps;
    entities outside the vocabulary are 0."""
    from rmbert.assemble import feature_ids, for_model
    from rmbert.data.generators import GENERATORS
    from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
    from rmbert.encoders.store import Encoding, cached_store
    from rmbert.models.features import FeatureVocab
    from rmbert.models.tables import ServingSource, serving_tables

    GENERATORS["entity"](tmp_path / "ent", 60, 0)
    train, dev = load_split(tmp_path / "ent" / "train"), load_split(tmp_path / "ent" / "dev")
    tok = load_tokenizer(str(tiny_encoder))
    enc = Encoding.of(BertNewsEncoder.from_pretrained(str(tiny_encoder), 12), tok)
    store = cached_store(dev.news.ids, dev.news.title, enc, progress=False)
    cfg = apply_overrides(preset("paper"), [f"encoder.name={tiny_encoder}", "rmbert.content_match=true"])
    cfg = for_model(cfg)
    assert cfg.features.vocab and cfg.features.entity_vectors  # switched on for the entity vectors
    vocab = FeatureVocab.fit(train.news, cfg.features, tmp_path / "ent" / "train" / "entity_embedding.vec")
    tables = feature_ids(cfg, vocab, store, [dev], tok)
    E = cfg.features.max_entities
    rows = store.rows(dev.news.ids)
    want = vocab.news_ids(dev.news, E)[:, 2:]
    assert tables["entity_ids"].shape == (len(store) + 1, E) and np.array_equal(
        tables["entity_ids"][rows], want
    )
    assert (want[:, 0] > 0).mean() > 0.5 and (tables["entity_ids"][0] == 0).all()
    news = dev.news
    info = [{"entities": news.entities(i)} for i in range(len(news))]
    src = ServingSource(list(news.ids), info, store.arrays["input_ids"][rows], store.arrays["attn"][rows])
    got = serving_tables(
        ("title_ids", "entity_ids"),
        src,
        vocab=vocab,
        match_width=2 + E,
        title_len=cfg.encoder.max_title_len,
        sep_token_id=tok.sep_token_id,
    )
    assert np.array_equal(got["entity_ids"], want)
    assert np.array_equal(got["title_ids"], tables["title_ids"][rows]) and (got["title_ids"][:, 0] > 0).all()


@pytest.mark.parametrize("model", ["dkn", "naml"])
def test_served_word_models_score_as_they_evaluate(model, tiny_encoder, tmp_path):
    """DKN and NAML are served from what the store keeps of each news: `rmbert encode` records
    the abstract and the title entities' mentions beside the title, and serving rebuilds
    `title_entity` (by offsets) and `abstract` from them, so the served scores equal
    evaluation's for a user not seen in training. A news posted with MIND's title_entities is
    aligned the same way."""
    from fastapi.testclient import TestClient

    from rmbert.data.generators import GENERATORS

    GENERATORS["entity"](tmp_path / "ent", 60, 0)
    app, dev, scores = served_as_evaluated(tiny_encoder, model, tmp_path / "ent", tmp_path)
    ids, news = dev.news.ids, tmp_path / "ent" / "dev" / "news.tsv"
    name = {"dkn": "title_entity", "naml": "abstract"}[model]
    with TestClient(app) as c:
        snap = c.app.state.serving.index.snapshot
        assert (np.asarray(snap.arrays[name])[1:] > 0).any(1).mean() > 0.5  # most news have them
        assert_ranks_as_evaluated(c, dev, scores)
        # a posted news with MIND's title_entities: the same row as the one encoded from news.tsv
        k = next(j for j in range(len(dev.news)) if dev.news.title_entities.mentions(j))
        line = next(row for row in open(news, encoding="utf-8") if row.startswith(ids[k] + "\t"))
        cols = line.rstrip("\n").split("\t")
        item = {
            "id": "POSTED1",
            "title": cols[3],
            "category": cols[1],
            "subcategory": cols[2],
            "abstract": cols[4],
            "entities": dev.news.entities(k),
            "title_entities": json.loads(cols[6]),
        }
        assert c.post("/news", json=[item]).status_code == 200
        snap = c.app.state.serving.index.snapshot
        a, b = snap.index["POSTED1"], snap.index[ids[k]]
        assert np.array_equal(np.asarray(snap.arrays[name][a]), np.asarray(snap.arrays[name][b]))
        assert (np.asarray(snap.arrays[name][a]) > 0).any()


def test_a_model_has_its_own_news_encoder_exactly_when_it_says_so():
    """`encodes_news` routes a batch's distinct news through `encode_news` once
    (`NewsRecModel._forward_encoded`): every model that sets it defines the encoder, and asking
    one without it for an encoder is a clear error, not a silent fallback."""
    from rmbert.assemble import MODELS
    from rmbert.models.base import Recommender

    own = {name for name, cls in MODELS.items() if cls.encode_news is not Recommender.encode_news}
    assert own == {name for name, cls in MODELS.items() if cls.encodes_news}
    assert {"nrms", "lstur", "dkn", "fim", "naml"} <= own and not own & {"rmbert", "npa", "deepfm", "dcn"}
    deepfm = DeepFM(DeepFMConfig(dim=E, field_dim=4, vocab_size=10, num_users=1, num_news=1))
    with pytest.raises(TypeError, match="deepfm has no news encoder"):
        deepfm.encode_news(NewsRepr(torch.zeros(1, 1, 4), None, None))
