"""From a config to a ready model, in one place: encoder, news store, feature vocabulary,
recommender, and the full model that trains as one module.

It sits one floor above config, data, encoders and models and imports only downward;
`run.py` (run-folder input and output) and the training, evaluation and serving code above it
build every model through here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rmbert.config import RunConfig
from rmbert.data.batching import Batch
from rmbert.data.mind import News, Split
from rmbert.encoders.bert import BertNewsEncoder, load_tokenizer
from rmbert.encoders.news import STORE_KIND, NewsSide, make_encoder
from rmbert.encoders.store import Encoding, NewsStore, cached_store
from rmbert.models.base import InferenceForm, Recommender
from rmbert.models.dcn import DCN
from rmbert.models.deepfm import DeepFM
from rmbert.models.dkn import DKN
from rmbert.models.features import FeatureVocab, NewsFeatures
from rmbert.models.fim import FIM
from rmbert.models.lstur import LSTUR
from rmbert.models.naml import NAML
from rmbert.models.npa import NPA
from rmbert.models.nrms import NRMS
from rmbert.models.rmbert import RMBERT
from rmbert.models.tables import TEXT_TABLES, VOCAB_TABLES, build_tables
from rmbert.types import NewsRepr

MODELS: dict[str, type[Recommender]] = {
    "rmbert": RMBERT,
    "nrms": NRMS,
    "lstur": LSTUR,
    "npa": NPA,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dkn": DKN,
    "fim": FIM,
    "naml": NAML,
}
ID_MODELS = ("deepfm", "dcn")  # user, news, category, subcategory id fields (+ TF-IDF of the title)


def for_model(cfg: RunConfig) -> RunConfig:
    """Switch on what the model needs of the feature vocabulary before it is fitted: `features.vocab`
    for models with id side inputs, and (DKN, `dkn.pretrained`) the entity vectors."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if not VOCAB_TABLES & set(MODELS[cfg.model].inputs_for(getattr(cfg, cfg.model))):
        return cfg
    out: dict = {"features.vocab": True}
    if cfg.model == "dkn":
        out["features.entity_vectors"] = cfg.dkn.pretrained or cfg.features.entities
    if cfg.model == "rmbert" and cfg.rmbert.content_match:
        out["features.entity_vectors"] = True  # eq. 8''''': r_j reads the vectors
    return cfg.override(out)


def resolve(
    cfg: RunConfig,
    dim: int,
    num_users: int,
    vocab: FeatureVocab | None = None,
    vocab_size: int = 0,
) -> RunConfig:
    """Fill in what comes from the encoder (D, its WordPiece vocabulary size) and the data
    (training users, feature vocabulary)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if cfg.encoder.mode == "words" and cfg.model == "rmbert":
        raise ValueError(
            "encoder mode 'words' is for baselines' own news encoders; RMBERT w/o BERT is mode 'lstm'"
        )
    words = cfg.encoder.mode == "words"
    if cfg.features.any and vocab is not None:
        cfg = cfg.override({f"features.{k}": v for k, v in vocab.sizes().items()})
    if cfg.features.history_position:
        cfg = cfg.override({"features.max_history": cfg.train.max_history})
    out = {"rmbert.dim": dim, "rmbert.vocab_size": vocab_size}
    f = cfg.features
    out |= {"rmbert.num_entities": f.num_entities, "rmbert.vector_dim": f.vector_dim}
    out |= {"rmbert.num_categories": f.num_categories, "rmbert.num_subcategories": f.num_subcategories}
    for m in ("nrms", "lstur", "npa"):
        out |= {f"{m}.dim": dim, f"{m}.word_encoder": words}
    out |= {"lstur.num_users": num_users, "npa.num_users": num_users}
    for m in ("deepfm", "dcn", "dkn", "fim", "naml"):
        out[f"{m}.dim"] = dim
    for m in ID_MODELS:
        out |= {f"{m}.num_users": num_users, f"{m}.num_news": f.num_news, f"{m}.vocab_size": vocab_size}
    for m in (*ID_MODELS, "naml"):
        out |= {f"{m}.num_categories": f.num_categories, f"{m}.num_subcategories": f.num_subcategories}
    source = "entity_embedding.vec" if f.vector_dim else "learned"
    out |= {"dkn.num_entities": f.num_entities, "dkn.vector_dim": f.vector_dim, "dkn.entity_source": source}
    out |= {"fim.max_history": cfg.train.max_history, "fim.title_len": cfg.encoder.max_title_len}
    return cfg.override(out)


def build_recommender(cfg: RunConfig) -> Recommender:
    return MODELS[cfg.model](getattr(cfg, cfg.model))


class NewsRecModel(nn.Module):
    """News side (+ optional news features) + recommender: store rows in, click logits [B, C] out.

    Per-store-row tables belong to the store, not the run (not buffers); `set_feature_ids`
    installs them with the store they belong to (row 0, the null news, all zero):
    with features, `feature_ids` [rows, F] holds each store row's feature ids; for a recommender
    with side inputs, `side` holds its named tables (models/tables.py), whose rows for a batch's
    news reach the recommender on `NewsRepr.extra`, token-id tables listed in `rec.word_inputs`
    embedded by the news side."""

    def __init__(self, news: NewsSide, rec: Recommender, features: NewsFeatures | None = None) -> None:
        super().__init__()
        self.news = news
        self.rec = rec
        self.features = features
        self.feature_ids: torch.Tensor | None = None  # not a buffer: it belongs to the store, not the run
        self.side: dict[str, torch.Tensor] = {}

    def set_feature_ids(self, ids) -> None:
        """The tables of `feature_ids(...)`: feature ids [rows, F] or None, or a dict of named side
        tables with the feature ids (or None) under "features"."""
        if isinstance(ids, dict):
            tables = dict(ids)
            ids = tables.pop("features", None)
            self.side = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in tables.items()}
        self.feature_ids = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)

    def add_side(self, news: NewsRepr, rows: torch.Tensor) -> NewsRepr:
        """news of store rows [B, K] + the recommender's side inputs on `extra` [B, K, ...]."""
        names = self.rec.side_inputs
        if not names:
            return news
        missing = [k for k in names if k not in self.side]
        if missing:
            raise RuntimeError(f"this model reads side tables {missing}: call set_feature_ids first")
        extra = {}
        for k in names:
            table = self.side[k]
            if table.device != rows.device:  # moved once per device, then kept there
                self.side[k] = table = table.to(rows.device)
            extra[k] = table[rows]
        for k in self.rec.word_inputs:
            extra[k + "_mask"] = extra[k] > 0
            extra[k] = self.news.embed_words(extra[k])
        return dataclasses.replace(news, extra=extra)

    def add_features(self, news: NewsRepr, rows: torch.Tensor) -> NewsRepr:
        """news.cls [B, K, D] + the features of store rows [B, K]."""
        if self.features is None:
            return news
        if self.feature_ids is None:
            raise RuntimeError("this model reads news features: call set_feature_ids first")
        ids = self.feature_ids.to(rows.device)[rows]  # [B, K, F]
        return dataclasses.replace(news, cls=news.cls + self.features(ids))

    @torch.no_grad()
    def candidate_vectors(self, rows: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """x_n [N, D] as the recommender reads candidates of store rows [N] (pooled or [CLS],
        standardised and with features as the run was trained): what serving ranks over."""
        parts = []
        for i in range(0, len(rows), chunk):
            r = rows[i : i + chunk][None]
            _, cand = self.news(r, r, False, False)
            parts.append(self.add_features(cand, r).cls[0])
        return torch.cat(parts) if parts else torch.zeros(0)

    @torch.no_grad()
    def split_terms(
        self, form: InferenceForm, rows: np.ndarray, chunk: int = 1024, progress: bool = False
    ) -> dict[str, torch.Tensor]:
        """The inference form's news terms of store rows [N], each [N, ...], with the news
        vectors ("cls") and the side tables the recommender reads: a split's candidate-only work
        done once per news, not once per (impression, candidate) pair (`score_terms`). The terms
        read only for recorded attentions (`record_terms`) are left out."""
        out: dict[str, torch.Tensor] = {}  # filled in place: no second copy of the whole split's terms
        dev = next(self.parameters(), torch.empty(0)).device
        store = getattr(self.news, "store", None)
        store = store if hasattr(store, "release") else None
        for n, i in enumerate(
            tqdm(range(0, len(rows), chunk), desc="news terms", unit="chunk", disable=not progress)
        ):
            if store is not None and n % 16 == 15:  # each news is read once: keep its pages out of RSS
                store.release()
            r = torch.from_numpy(np.asarray(rows[i : i + chunk], dtype=np.int64)).to(dev)[None]  # [1, N']
            _, cand = self.news(r[:, :1], r, False, True)
            cand = self.add_side(self.add_features(cand, r), r)
            got = form.news_terms(NewsRepr(cand.cls[0], cand.tokens[0], cand.mask[0]))
            got["cls"] = cand.cls[0]
            got.update({k: v[0] for k, v in (cand.extra or {}).items()})
            for k, v in got.items():
                if k in form.record_terms:
                    continue
                if k not in out:
                    out[k] = v.new_zeros(len(rows), *v.shape[1:])
                if v.shape[1:] != out[k].shape[1:]:  # the title axes are all in record_terms
                    raise ValueError(f"news term {k!r} changes shape between chunks: {tuple(v.shape[1:])}")
                out[k][i : i + len(v)] = v
        if store is not None:
            store.release()
        return out

    def score_terms(
        self, form: InferenceForm, batch: Batch, terms: dict, local: torch.Tensor
    ) -> torch.Tensor:
        """Click logits [B, C] of a batch whose candidates' terms are rows of `split_terms`:
        `local` [store rows] maps a store row to its row there."""
        hist, _ = self.news(batch.hist, batch.hist[:, :1], self.rec.needs_history_tokens, False)
        hist = self.add_side(self.add_history_features(hist, batch), batch.hist)
        idx = local[batch.cand]  # [B, C]
        got = {k: v[idx] for k, v in terms.items()}
        x = got.pop("cls")
        got |= {"history_" + k: v for k, v in (hist.extra or {}).items()}
        if hist.tokens is not None:
            got["history_tokens"], got["history_mask"] = hist.tokens, hist.mask
        return form.score(hist.cls, batch.hist_mask, NewsRepr(x, None, None), got).logits

    def add_history_features(self, hist: NewsRepr, batch: Batch) -> NewsRepr:
        """Clicked news get their features and, with history_position, their recency embedding."""
        hist = self.add_features(hist, batch.hist)
        if self.features is None or self.features.pos is None:
            return hist
        return dataclasses.replace(hist, cls=hist.cls + self.features.positions(batch.hist_mask))

    @property
    def reads_tokens(self) -> tuple[bool, bool]:
        """Whether the recommender reads the clicked news' and the candidates' title tokens."""
        return self.rec.needs_history_tokens, self.rec.needs_candidate_tokens

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.rec.encodes_news and (self.features is None or self.features.pos is None):
            return self._forward_encoded(batch)
        if not self.rec.dedup_candidates:
            hist, cand = self.news(batch.hist, batch.cand, *self.reads_tokens)
            hist, cand = self.add_history_features(hist, batch), self.add_features(cand, batch.cand)
            hist, cand = self.add_side(hist, batch.hist), self.add_side(cand, batch.cand)
            return self.rec(hist, batch.hist_mask, cand, batch.users)
        # each candidate news once: a news shown in several impressions of the batch shares its
        # candidate-only computation (RMBERT's query unit)
        uniq, inv = torch.unique(batch.cand, return_inverse=True)  # [U], [B, C]
        hist, cand = self.news(batch.hist, uniq[None], *self.reads_tokens)
        hist, cand = self.add_history_features(hist, batch), self.add_features(cand, uniq[None])
        hist, cand = self.add_side(hist, batch.hist), self.add_side(cand, uniq[None])
        extra = None if cand.extra is None else {k: v[0] for k, v in cand.extra.items()}
        tokens = None if cand.tokens is None else cand.tokens[0]  # None: the recommender reads no tokens
        mask = None if cand.mask is None else cand.mask[0]
        cand = NewsRepr(cls=cand.cls[0], tokens=tokens, mask=mask, index=inv, extra=extra)
        return self.rec(hist, batch.hist_mask, cand, batch.users)

    def _forward_encoded(self, batch: Batch) -> torch.Tensor:
        """Each distinct news of the batch, clicked or candidate, through the recommender's own
        news encoder once (`Recommender.encodes_news`), its encoding then gathered to every slot.
        (Not with history_position, which makes a clicked news's input depend on its slot.)"""
        (B, M), C = batch.hist.shape, batch.cand.shape[1]
        uniq, inv = torch.unique(
            torch.cat([batch.hist.reshape(-1), batch.cand.reshape(-1)]), return_inverse=True
        )
        rows = uniq[None]  # [1, U]
        tokens = self.rec.needs_history_tokens or self.rec.needs_candidate_tokens
        news, _ = self.news(rows, rows[:, :1], tokens, False)
        news = self.add_side(self.add_features(news, rows), rows)
        enc = self.rec.encode_news(news)  # [1, U, ...], or a list of them

        def take(idx: torch.Tensor) -> NewsRepr:  # [B, K] -> the news at those slots
            got = [t[0][idx] for t in enc] if isinstance(enc, list) else enc[0][idx]
            return NewsRepr(cls=news.cls[0][idx], tokens=None, mask=None, encoded=got)

        inv = inv.to(news.cls.device)
        hist, cand = take(inv[: B * M].view(B, M)), take(inv[B * M :].view(B, C))
        return self.rec(hist, batch.hist_mask, cand, batch.users)


def load_encoder(cfg: RunConfig, tokenizer_dir: Path | None = None):
    src = str(tokenizer_dir) if tokenizer_dir is not None and tokenizer_dir.is_dir() else cfg.encoder.name
    tokenizer = load_tokenizer(src)
    encoder = BertNewsEncoder.from_pretrained(cfg.encoder.name, cfg.encoder.max_title_len)
    encoder.sep_token_id = tokenizer.sep_token_id
    return encoder, tokenizer


def split_news(*splits: Split) -> tuple[list[str], list[str]]:
    """Union of the splits' news (first title wins), in first-seen order."""
    seen: dict[str, str] = {}
    for s in splits:
        for nid, title in zip(s.news.ids, s.news.title):
            seen.setdefault(nid, title)
    return list(seen), list(seen.values())


def store_for(cfg: RunConfig, enc: Encoding, splits: list[Split], progress: bool) -> NewsStore:
    """The (cached) store of the splits' news, of the kind the encoder mode reads."""
    ids, titles = split_news(*splits)
    kind = STORE_KIND[cfg.encoder.mode]
    k = cfg.encoder.top_k if kind == "lower" else 0
    return cached_store(ids, titles, enc, kind=kind, k=k, progress=progress)


def build_model(cfg: RunConfig, encoder: BertNewsEncoder, store: NewsStore | None) -> NewsRecModel:
    enc = make_encoder(cfg.encoder.mode, encoder)
    e = cfg.encoder
    news = NewsSide(e.mode, enc, store, e.top_k, e.dedup, e.pooling)  # type: ignore[arg-type]
    features = NewsFeatures(cfg.features, encoder.dim) if cfg.features.adds else None
    return NewsRecModel(news, build_recommender(cfg), features)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    return load_tokenizer(name)


def feature_ids(
    cfg: RunConfig, vocab: FeatureVocab | None, store: NewsStore, splits: list[Split], tokenizer=None
):
    """The per-store-row tables of the splits' news: feature ids [store rows, F] (None when the
    run adds no features); for a model with side inputs, a dict of its side tables with the
    feature ids under "features". Side tables that read text (title entities, abstracts) use
    `tokenizer`, by default the encoder's (the one a run saves)."""
    ids = None
    if cfg.features.adds and vocab is not None:
        F = 2 + cfg.features.max_entities
        ids = np.zeros((len(store) + 1, F), np.int64)
        for split in splits:
            rows = store.rows(split.news.ids)
            news_ids = vocab.news_ids(split.news, cfg.features.max_entities)
            ids[rows[rows > 0]] = news_ids[rows > 0]
    names = MODELS[cfg.model].inputs_for(getattr(cfg, cfg.model))
    if not names:
        return ids
    tables = build_tables(
        names,
        [s.news for s in splits],
        [store.rows(s.news.ids) for s in splits],
        store.arrays,
        vocab,
        tokenizer or (_tokenizer(cfg.encoder.name) if TEXT_TABLES & set(names) else None),
        cfg.encoder.max_title_len,
        cfg.naml.abstract_len,
        2 + cfg.features.max_entities,
    )
    return {"features": ids, **tables}


@dataclass
class Built:
    """What `assemble` returns: the resolved config and everything the model needs."""

    cfg: RunConfig
    model: NewsRecModel
    store: NewsStore
    vocab: FeatureVocab | None
    encoding: Encoding


def assemble(
    cfg: RunConfig,
    splits: list[Split],
    rank: int,
    world: int,
    progress: bool,
    users: list[str],
    train_news: News,
) -> Built:
    """The model to train over `splits`: the encoder, the news store of the splits' news (rank 0
    builds it, other ranks wait and open it), the feature vocabulary fitted on `train_news`,
    the config resolved against both, and the model with seed-determined initial weights."""
    import torch.distributed as dist

    encoder, tokenizer = load_encoder(cfg)
    enc = Encoding.of(encoder, tokenizer)
    vectors = splits[0].path / "entity_embedding.vec"
    cfg = for_model(cfg)
    vocab = FeatureVocab.fit(train_news, cfg.features, vectors) if cfg.features.any else None
    cfg = resolve(cfg, encoder.dim, len(users), vocab, encoder.bert.config.vocab_size)
    if rank != 0:
        dist.barrier()  # rank 0 builds the news store first; the others then open it
    store = store_for(cfg, enc, splits, progress and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    torch.manual_seed(cfg.train.seed)  # the recommender's initial weights depend on the seed only
    model = build_model(cfg, encoder, store)
    tables = feature_ids(cfg, vocab, store, splits, tokenizer)
    model.set_feature_ids(tables)
    if isinstance(tables, dict):  # what the recommender fits on the training news (e.g. an IDF)
        rows = store.rows(train_news.ids)
        model.rec.fit_training_news(vocab, {k: v.numpy()[rows] for k, v in model.side.items()})
    if model.features is not None and vocab is not None:
        model.features.set_vectors(vocab.vectors)
    if cfg.encoder.mode == "frozen" and cfg.encoder.standardize:
        model.news.fit_standardizer(seed=cfg.train.seed)
    return Built(cfg, model, store, vocab, enc)
