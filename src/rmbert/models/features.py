"""News features beyond the title: category, subcategory and entity embeddings added to news vectors.

MIND gives every news a category, a subcategory and linked entities (WikidataIds); the paper's
encoder reads titles only. With `features.*` switched on, every news vector that a recommender
sees (x_n for candidates, h_i for clicked news) becomes

    x_n + E_cat[category] + E_sub[subcategory] + mean_e (E_ent[e] + W_v v_e)        [D]

with embeddings learned from the training clicks, zero for a value never seen in training (row 0),
and v_e the entity's pretrained vector from the training split's `entity_embedding.vec` (MIND's
100-d TransE vectors; `entity_vectors`), projected by a learned W_v. With `history_position`,
clicked news also get E_pos[r], r = 1 for the most recent click, 2 for the one before, ...
The vocabulary is fitted on the training split's news only and saved in the run as
`features.json`. Shape letters: N news, F = 2 + max_entities feature slots, D hidden, V vector width.

Models that read ids themselves (DeepFM, DCN, DKN, NAML: `Recommender.side_inputs`) switch on
`vocab`: the vocabulary is fitted and saved, with the training news ids too (DeepFM's and DCN's
news-id field), and nothing is added to the news vectors unless a feature is switched on as well.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmbert.data.mind import News, load_entity_vectors


@dataclass(frozen=True)
class FeatureConfig:
    category: bool = False
    subcategory: bool = False
    entities: bool = False
    entity_vectors: bool = False  # add the projected entity_embedding.vec vectors where the split has one
    history_position: bool = False  # clicked news get a learned embedding of their recency rank
    max_entities: int = 5  # entity slots per news (title entities first, then the abstract's)
    min_count: int = 2  # an entity needs this many training news to get its own embedding
    init_std: float = 0.1  # the embeddings' initial std (standardised news vectors have std 1 per dimension)
    # resolved from the training data (the vocabulary sizes, unknown = row 0 included)
    num_categories: int = 0
    num_subcategories: int = 0
    num_entities: int = 0
    vector_dim: int = 0  # V: the width of entity_embedding.vec
    max_history: int = 0  # positions for history_position (train.max_history)
    vocab: bool = False  # fit and save the vocabulary for a model's own id inputs (set from the model)
    num_news: int = 0  # training news + 1 (with vocab)

    def __post_init__(self) -> None:
        if not self.init_std >= 0.0:
            raise ValueError(f"features.init_std must be >= 0, not {self.init_std}")
        if self.max_entities < 1 or self.min_count < 1:
            raise ValueError("features.max_entities and features.min_count must be >= 1")
        if self.entity_vectors and not (self.entities or self.vocab):
            raise ValueError("features.entity_vectors needs features.entities=true")

    @property
    def adds(self) -> bool:
        """Something is added to the news vectors (NewsFeatures)."""
        return self.category or self.subcategory or self.entities or self.history_position

    @property
    def any(self) -> bool:
        """The run fits and saves a vocabulary (features.json)."""
        return self.adds or self.vocab


@dataclass
class FeatureVocab:
    """Training-split values -> embedding rows (0 = unknown), and the entities' pretrained vectors."""

    categories: list[str] = field(default_factory=list)
    subcategories: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None  # [len(entities) + 1, V] (row 0 and entities without one: zero)
    news: list[str] = field(default_factory=list)  # training news ids (with `vocab`), in file order

    @classmethod
    def fit(cls, news: News, cfg: FeatureConfig, vectors_file: Path | None = None) -> FeatureVocab:
        """Categories and subcategories of the training news; entities named by at least
        `min_count` of them, or (with entity vectors) by one and present in `vectors_file`."""
        counts: Counter[str] = Counter()
        for i in range(len(news)):
            counts.update(news.entities(i)[: cfg.max_entities])
        table: dict[str, np.ndarray] = {}
        if cfg.entity_vectors and vectors_file is not None and Path(vectors_file).is_file():
            ids, vecs = load_entity_vectors(vectors_file)  # no file: learned embeddings only (vector_dim 0)
            table = dict(zip(ids, vecs))
        entities = sorted(e for e, c in counts.items() if c >= cfg.min_count or e in table)
        vectors = None
        if table:
            width = len(next(iter(table.values())))
            vectors = np.zeros((len(entities) + 1, width), np.float32)
            for i, e in enumerate(entities, 1):
                if e in table:
                    vectors[i] = table[e]
        news_ids = list(news.ids) if cfg.vocab else []
        return cls(sorted(set(news.category)), sorted(set(news.subcategory)), entities, vectors, news_ids)

    def sizes(self) -> dict[str, int]:
        return {
            "num_categories": len(self.categories) + 1,
            "num_subcategories": len(self.subcategories) + 1,
            "num_entities": len(self.entities) + 1,
            "vector_dim": 0 if self.vectors is None else int(self.vectors.shape[1]),
            "num_news": len(self.news) + 1,
        }

    def save(self, path: str | Path) -> None:
        """The names only: the vectors are saved with the model's weights."""
        names = {k: getattr(self, k) for k in ("categories", "subcategories", "entities")}
        if self.news:
            names["news"] = self.news
        Path(path).write_text(json.dumps(names, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FeatureVocab:
        try:
            data = json.loads(Path(path).read_text())
            names = {k: list(map(str, data[k])) for k in ("categories", "subcategories", "entities")}
            return cls(**names, news=list(map(str, data.get("news", []))))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a features vocabulary ({e})") from None

    def ids(
        self, categories: list[str], subcategories: list[str], entities: list[list[str]], max_entities: int
    ) -> np.ndarray:
        """Feature ids [N, 2 + max_entities] int64: category, subcategory, entities (0 = unknown/pad)."""
        cat = {v: i + 1 for i, v in enumerate(self.categories)}
        sub = {v: i + 1 for i, v in enumerate(self.subcategories)}
        ent = {v: i + 1 for i, v in enumerate(self.entities)}
        out = np.zeros((len(categories), 2 + max_entities), np.int64)
        for i, (c, s, es) in enumerate(zip(categories, subcategories, entities)):
            out[i, 0], out[i, 1] = cat.get(c, 0), sub.get(s, 0)
            known = [ent[e] for e in es[:max_entities] if e in ent]
            out[i, 2 : 2 + len(known)] = known
        return out

    def news_ids(self, news: News, max_entities: int) -> np.ndarray:
        ents = [news.entities(i) for i in range(len(news))]
        return self.ids(news.category, news.subcategory, ents, max_entities)


class NewsFeatures(nn.Module):
    """Feature ids [..., F] -> the vector added to a news vector [..., D]; and the recency
    embedding of clicked news (`positions`)."""

    def __init__(self, cfg: FeatureConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.cat = nn.Embedding(cfg.num_categories, dim, padding_idx=0) if cfg.category else None
        self.sub = nn.Embedding(cfg.num_subcategories, dim, padding_idx=0) if cfg.subcategory else None
        self.ent = nn.Embedding(cfg.num_entities, dim, padding_idx=0) if cfg.entities else None
        self.pos = nn.Embedding(cfg.max_history + 1, dim, padding_idx=0) if cfg.history_position else None
        for emb in (self.cat, self.sub, self.ent, self.pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.init_std)
                emb.weight.data[0].zero_()
        self.ent_proj = None
        if cfg.entity_vectors and cfg.vector_dim:
            self.register_buffer("ent_vec", torch.zeros(cfg.num_entities, cfg.vector_dim))  # [E, V], saved
            self.ent_proj = nn.Linear(cfg.vector_dim, dim, bias=False)  # W_v

    def set_vectors(self, vectors: np.ndarray | None) -> None:
        if self.ent_proj is not None and vectors is not None:
            self.ent_vec.copy_(torch.from_numpy(vectors))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = 0.0
        if self.cat is not None:
            out = out + self.cat(ids[..., 0])
        if self.sub is not None:
            out = out + self.sub(ids[..., 1])
        if self.ent is not None:
            e = ids[..., 2:]  # [..., E]
            n = (e > 0).sum(-1, keepdim=True).clamp(min=1)
            per = self.ent(e)  # [..., E, D]
            if self.ent_proj is not None:
                per = per + self.ent_proj(self.ent_vec[e])  # row 0 is zero: padding adds nothing
            out = out + per.sum(-2) / n
        return out  # type: ignore[return-value]

    def positions(self, mask: torch.Tensor) -> torch.Tensor | float:
        """History mask [B, M] (left-aligned, most recent last) -> recency embeddings [B, M, D]."""
        return 0.0 if self.pos is None else self.pos(self.recency(mask))

    def recency(self, mask: torch.Tensor) -> torch.Tensor:
        """History mask [B, M] (left-aligned, most recent last) -> each click's row of E_pos [B, M]
        (1 = the most recent click, 0 = a padded slot)."""
        n = mask.sum(-1, keepdim=True)  # [B, 1]
        rank = n - torch.arange(mask.shape[-1], device=mask.device)  # 1 = the most recent click
        return (rank * mask).clamp(0, self.cfg.max_history).long()
