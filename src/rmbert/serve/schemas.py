"""Typed request and response bodies of the HTTP service."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, field_validator

# Every string a client sends is capped: nothing unbounded is parsed, stored or echoed back.
ID_MAX, TITLE_MAX, ABSTRACT_MAX, LABEL_MAX = 64, 1000, 5000, 100
NewsId = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX)]


class RankRequest(BaseModel):
    history: list[NewsId] = Field(
        default_factory=list, max_length=10_000, description="clicked news ids, oldest first"
    )
    candidates: list[NewsId] | None = Field(
        None, max_length=10_000, description="news ids to rank; null = the freshest news in the store"
    )
    top_k: int = Field(10, ge=1, le=10_000, description="how many ranked news to return")
    explain: bool = Field(
        False, description="add each reasoning step's attention over history and title words"
    )
    diversity: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="MMR re-ranking of the top_k: 0 = by score only, 1 = each pick as unlike the ones "
        "before as possible",
    )


class Weighted(BaseModel):
    id: str | None = None
    word: str | None = None
    weight: float


class Step(BaseModel):
    history: list[Weighted]
    title: list[Weighted]


class Ranked(BaseModel):
    id: str
    score: float
    title: str = ""
    category: str = ""
    steps: list[Step] | None = None


class RankResponse(BaseModel):
    ranked: list[Ranked]
    history_used: int
    candidates: int
    duplicates_dropped: int = 0
    note: str | None = None


class EntityLink(BaseModel):
    """One item of MIND's title_entities column: where the title names an entity."""

    WikidataId: str = Field(min_length=1, max_length=LABEL_MAX)
    Label: str = Field("", max_length=LABEL_MAX)
    SurfaceForms: list[Annotated[str, StringConstraints(max_length=TITLE_MAX)]] = Field(
        default_factory=list, max_length=16
    )
    OccurrenceOffsets: list[int] = Field(default_factory=list, max_length=16)


class NewsItem(BaseModel):
    id: str = Field(min_length=1, max_length=ID_MAX)
    title: str = Field(min_length=1, max_length=TITLE_MAX)
    category: str = Field("", max_length=LABEL_MAX)
    subcategory: str = Field("", max_length=LABEL_MAX)
    abstract: str = Field("", max_length=ABSTRACT_MAX)
    entities: list[Annotated[str, StringConstraints(max_length=LABEL_MAX)]] = Field(
        default_factory=list, max_length=64, description="linked entities (WikidataIds), as MIND's"
    )
    title_entities: list[EntityLink] = Field(
        default_factory=list,
        max_length=64,
        description="MIND's title_entities: where the title names each entity (read by DKN)",
    )

    @field_validator("id")
    @classmethod
    def _no_space(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError("news id must not contain whitespace")
        return v

    def record(self) -> dict:
        """What the store keeps beside the title (`rmbert.models.tables.info_of`'s fields), the
        mentions parsed as MIND's reader parses them."""
        from rmbert.data.mind import _surface_forms

        out: dict = {"category": self.category, "subcategory": self.subcategory, "entities": self.entities}
        if self.abstract:
            out["abstract"] = self.abstract
        links: dict[str, list] = {}
        for e in self.title_entities:
            links.setdefault(e.WikidataId.strip(), []).extend(list(m) for m in _surface_forms(e.model_dump()))
        if links:
            out["mentions"] = [[q, ms] for q, ms in links.items()]
        return out


class NewsBatch(BaseModel):
    news: list[NewsItem] = Field(max_length=100_000)


class NewsAdded(BaseModel):
    added: int
    updated: int
    store_size: int


class NewsInfo(BaseModel):
    id: str
    title: str
    category: str = ""
    subcategory: str = ""
