"""Per-news side inputs beyond the news side's vectors: named tables with one row per store row.

A recommender names the tables it reads (`Recommender.side_inputs`); `build_tables` makes them
for the news of some splits, in store-row order (row 0, the null news, is all zero), and
`NewsRecModel` hands a batch's rows of them to the recommender on `NewsRepr.extra` ([B, K, ...]).
Like the feature ids, the tables belong to a store, not to the run: they are rebuilt (from the
saved vocabulary and the tokenizer) whenever a run is pointed at another store.

    news_id       [R]     training news id (FeatureVocab.news; 0 = a news not in training)
    category      [R]     FeatureVocab category id (0 = unknown)
    subcategory   [R]     FeatureVocab subcategory id (0 = unknown)
    title_ids     [R, L]  the title's WordPiece ids exactly as the news side reads them (the
                          store's input_ids without [CLS]/[SEP]; 0 = padding), so position l is
                          NewsRepr.tokens[..., l, :]
    title_entity  [R, L]  per title token: the FeatureVocab id of the title entity that names it
                          (0 = none): by MIND's character offsets, else by surface form (see
                          `align_entities`)
    abstract      [R, A]  the abstract's WordPiece ids (A = abstract_len; 0 = padding); the store
                          keeps the abstract's text (not its vectors), so abstracts are tokenized
                          here with the run's tokenizer
    entity_ids    [R, E]  FeatureVocab ids of up to E = F - 2 (features.max_entities) entities, title's
                          first (0 = none or not in the vocabulary), as the feature ids hold them
    match         [R, F]  hashed category, subcategory and up to F - 2 distinct entities (title's
                          first, then the abstract's), 0 = none (`match_ids`): for exact equality
                          tests only, so news and entities never seen in training still match

Serving builds the same tables from what the store keeps of each news (`serving_tables`): its
id, its token ids, and its news.jsonl record (category, subcategory, entities, and where given the
abstract and the title entities' mentions, `info_of`).

Shape letters: R store rows (row 0 included), L title tokens, A abstract tokens, F match slots.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rmbert.data.mind import News
from rmbert.models.features import FeatureVocab

TABLES = (
    "news_id",
    "category",
    "subcategory",
    "title_ids",
    "title_entity",
    "abstract",
    "match",
    "entity_ids",
)
VOCAB_TABLES = frozenset(
    {"news_id", "category", "subcategory", "title_entity", "entity_ids"}
)  # need the vocabulary
TEXT_TABLES = frozenset({"title_ids", "title_entity", "abstract"})  # need the tokenizer
TITLE_TABLES = frozenset({"title_ids", "title_entity"})  # with a title-token axis L


def match_key(kind: str, value: str) -> int:
    """A stable 56-bit id of a (kind, value) pair, 0 for an empty value: the same in every
    process and for every store, so training, evaluation and serving agree without a vocabulary."""
    if not value:
        return 0
    h = int.from_bytes(hashlib.blake2b(f"{kind}:{value}".encode(), digest_size=7).digest(), "little")
    return h or 1


def match_ids(category: str, subcategory: str, entities: list[str], width: int) -> np.ndarray:
    """One news's `match` row [width]: category, subcategory, then its distinct entities."""
    out = np.zeros(width, np.int64)
    out[0], out[1] = match_key("c", category), match_key("s", subcategory)
    distinct = list(dict.fromkeys(e for e in entities if e))[: width - 2]
    out[2 : 2 + len(distinct)] = [match_key("e", e) for e in distinct]
    return out


SERVABLE_TABLES = frozenset(TABLES)


def info_of(news: News, i: int) -> dict:
    """What the store keeps of news `i` beside its title (its news.jsonl record), as serving reads
    it back: category, subcategory, entities, and the abstract and the title entities' mentions
    ([WikidataId, [[surface form, character offset or -1], ...]], `TitleEntities.mentions`) where
    the news has them."""
    out: dict = {
        "category": news.category[i],
        "subcategory": news.subcategory[i],
        "entities": news.entities(i),
    }
    if news.abstract[i]:
        out["abstract"] = news.abstract[i]
    mentions = news.title_entities.mentions(i) if news.title_entities is not None else []
    if mentions:
        out["mentions"] = [[qid, [list(m) for m in ms]] for qid, ms in mentions]
    return out


@dataclass(frozen=True)
class _InfoMentions:
    """News records as `_entity_links` reads a split's News: titles, and mentions per row."""

    title: list[str]
    rows: list[list]

    @property
    def title_entities(self) -> _InfoMentions:
        return self

    def mentions(self, i: int) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
        return [(str(q), tuple((str(f), int(s)) for f, s in ms)) for q, ms in self.rows[i]]


VOCAB_NAMES = {"news_id": "news", "category": "categories", "subcategory": "subcategories"}


def entity_ids(vocab: FeatureVocab | None, entities: list[list[str]], width: int) -> np.ndarray:
    """The `entity_ids` rows [N, width] of news with these entities (FeatureVocab.ids' entity part)."""
    if vocab is None:
        raise ValueError("the side input 'entity_ids' needs the feature vocabulary")
    return vocab.ids([""] * len(entities), [""] * len(entities), entities, width)[:, 2:]


def vocab_ids(vocab: FeatureVocab | None, name: str, values: list[str]) -> np.ndarray:
    """The FeatureVocab ids [N] of `values` for the id table `name` (0 = not in training)."""
    if vocab is None:
        raise ValueError(f"the side input {name!r} needs the feature vocabulary")
    lookup = {v: i + 1 for i, v in enumerate(getattr(vocab, VOCAB_NAMES[name]))}
    return np.array([lookup.get(v, 0) for v in values], np.int64)


@dataclass(frozen=True)
class ServingSource:
    """What serving knows of N news, to build side tables from (see `serving_tables`)."""

    ids: list[str]
    info: list[dict]  # category, subcategory, entities
    input_ids: np.ndarray  # [N, S] the store's
    attn: np.ndarray  # [N, S]


def serving_tables(
    names: tuple[str, ...],
    src: ServingSource,
    *,
    vocab: FeatureVocab | None = None,
    match_width: int = 7,
    title_len: int = 0,
    sep_token_id: int = 0,
    tokenizer=None,
    abstract_len: int = 50,
) -> dict[str, np.ndarray]:
    """The side tables `names` [N, ...] of the news `src` as `build_tables` makes them, built
    from what serving keeps: the news ids, the store's token ids and each news's record
    (`info_of`; `abstract` and `title_entity` need the run's tokenizer). A news whose record
    lacks its abstract or mentions gets an empty row, as a split without them gives."""
    unknown = set(names) - SERVABLE_TABLES
    if unknown:
        raise ValueError(f"serving cannot build the side input(s) {sorted(unknown)}")
    if TEXT_TABLES & set(names) - {"title_ids"} and tokenizer is None:
        raise ValueError(f"side inputs {sorted(TEXT_TABLES & set(names))} need the run's tokenizer")
    info, out = src.info, {}
    if "match" in names:
        rows = [
            match_ids(
                d.get("category") or "",
                d.get("subcategory") or "",
                list(d.get("entities") or []),
                match_width,
            )
            for d in info
        ]
        out["match"] = np.stack(rows) if rows else np.zeros((0, match_width), np.int64)
    for name in VOCAB_NAMES:
        if name in names:  # values read only for the tables asked for (this runs for every news)
            values = src.ids if name == "news_id" else [d.get(name) or "" for d in info]
            out[name] = vocab_ids(vocab, name, values)
    if "title_ids" in names:
        out["title_ids"] = title_ids(np.asarray(src.input_ids), np.asarray(src.attn), title_len, sep_token_id)
    if "entity_ids" in names:
        out["entity_ids"] = entity_ids(vocab, [list(d.get("entities") or []) for d in info], match_width - 2)
    if "abstract" in names:
        out["abstract"] = _tokenize(tokenizer, [d.get("abstract") or "" for d in info], abstract_len)
    if "title_entity" in names:
        if vocab is None:
            raise ValueError("the side input 'title_entity' needs the feature vocabulary")
        titles = title_ids(np.asarray(src.input_ids), np.asarray(src.attn), title_len, sep_token_id)
        records = _InfoMentions([d.get("title") or "" for d in info], [d.get("mentions") or [] for d in info])
        ent_index = {v: i + 1 for i, v in enumerate(vocab.entities)}
        with_mentions = np.array([i for i, d in enumerate(info) if d.get("mentions")], np.int64)
        found = _entity_links(tokenizer, records, with_mentions, titles[with_mentions], ent_index, title_len)
        out["title_entity"] = np.zeros((len(info), title_len), np.int64)
        for i, links in found.items():
            out["title_entity"][i] = align_entities(titles[i], *links)
    return out


def idf_weights(titles: np.ndarray, vocab_size: int) -> np.ndarray:
    """idf(t) = ln((1 + N) / (1 + df(t))) + 1 [V] float32, from the title token ids [N, L]
    (0 = padding) of N news; a WordPiece no title has gets the largest value."""
    df = np.zeros(vocab_size, np.float64)
    for row in titles:
        t = np.unique(row[row > 0])
        df[t[t < vocab_size]] += 1
    return (np.log((1.0 + len(titles)) / (1.0 + df)) + 1.0).astype(np.float32)


def title_ids(input_ids: np.ndarray, attn: np.ndarray, L: int, sep_token_id: int) -> np.ndarray:
    """Store input ids, attention [R, S] -> title token ids [R, L] (rmbert.encoders.lstm.title_part
    in numpy), 0 where the news side masks the position."""
    tok = np.asarray(input_ids[:, 1 : L + 1], dtype=np.int64)
    mask = np.asarray(attn[:, 1 : L + 1], dtype=bool) & (tok != sep_token_id)
    out = np.zeros((len(tok), L), np.int64)
    out[:, : tok.shape[1]] = np.where(mask, tok, 0)
    return out


def align_entities(
    title: np.ndarray, spans: np.ndarray | None, links: list[tuple[int, list[tuple[list[int], int, int]]]]
) -> np.ndarray:
    """The entity id of every title token [L], 0 = none. `title`: token ids [L] (0 = padding);
    `spans`: each token's character span in the title [L, 2] (None: unknown); `links`: the title's
    entities in MIND's order, each (vocabulary id, its mentions: (surface form's token ids,
    character start, end), start -1 where MIND gives no offset). A token gets the entity of the
    first link that names it:
    - by offsets (MIND's OccurrenceOffsets against the tokenizer's character spans): exact;
    - else by the surface form's WordPiece sequence found in the title's (WordPiece splits words
      independently of their neighbours, so a form tokenizes alone as in the title); forms with
      an unknown word ([UNK] would match any unknown word) are not searched.
    Mentions cut off by the title length L are lost."""
    out = np.zeros(len(title), np.int64)
    n = int((title > 0).sum())  # the title tokens are a prefix
    for ent, mentions in links:
        if ent == 0:
            continue
        for form, start, end in mentions:
            if spans is not None and start >= 0:
                hit = (spans[:, 0] < end) & (spans[:, 1] > start) & (title > 0) & (out == 0)
                out[hit] = ent
                continue
            k = len(form)
            if k == 0 or k > n:
                continue
            f = np.asarray(form, np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(title[:n], k)  # [n - k + 1, k]
            for s in np.flatnonzero((windows == f).all(1)):
                span = out[s : s + k]
                span[span == 0] = ent
    return out


def _tokenize(tokenizer, texts: list[str], length: int, chunk: int = 8192) -> np.ndarray:
    """WordPiece ids [N, length] without special tokens, 0 = padding."""
    out = np.zeros((len(texts), length), np.int64)
    for i in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[i : i + chunk],
            add_special_tokens=False,
            max_length=length,
            truncation=True,
            padding="max_length",
            return_attention_mask=True,
        )
        ids = np.asarray(enc["input_ids"], np.int64).reshape(-1, length)
        out[i : i + chunk] = ids * np.asarray(enc["attention_mask"], np.int64).reshape(-1, length)
    return out


def _entity_links(
    tokenizer,
    news: News | _InfoMentions,
    rows: np.ndarray,
    titles: np.ndarray,
    ent_index: dict[str, int],
    L: int,
) -> dict[int, tuple[np.ndarray | None, list]]:
    """For the news `rows` of `news` with title entities: (token spans or None, links) as
    `align_entities` reads them; `titles` [len(rows), L] are their title token ids in the store."""
    ents = news.title_entities
    assert ents is not None
    per = {int(i): ents.mentions(int(i)) for i in rows}
    per = {i: m for i, m in per.items() if m}
    if not per:
        return {}
    order = list(per)
    spans: dict[int, np.ndarray | None] = dict.fromkeys(order)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            [news.title[i] for i in order], max_length=L + 2, truncation=True, return_offsets_mapping=True
        )
        where = {int(i): j for j, i in enumerate(rows)}
        for i, ids, offs in zip(order, enc["input_ids"], enc["offset_mapping"]):
            tok = np.zeros(L, np.int64)
            got = np.asarray(ids[1 : L + 1], np.int64)
            tok[: len(got)] = got
            t = titles[where[i]]
            if np.array_equal(np.where(t > 0, tok, 0), t):  # tokenized as the store did
                sp = np.zeros((L, 2), np.int64)
                o = np.asarray(offs[1 : L + 1], np.int64).reshape(-1, 2)
                sp[: len(o)] = o
                spans[i] = sp
    forms = [f for i in order for _, ms in per[i] for f, _ in ms]
    ids = iter(tokenizer(forms, add_special_tokens=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    out = {}
    for i in order:
        links = []
        for qid, ms in per[i]:
            mentions = []
            for f, start in ms:
                form = next(ids)
                mentions.append(([] if unk in form else form, start, start + len(f) if start >= 0 else -1))
            links.append((ent_index.get(qid, 0), mentions))
        out[i] = (spans[i], links)
    return out


def _fill(
    out: dict[str, np.ndarray],
    news: News,
    take: np.ndarray,
    r: np.ndarray,
    vocab: FeatureVocab | None,
    tokenizer,
    titles: np.ndarray | None,
    title_len: int,
    abstract_len: int,
) -> None:
    """Write the rows r of `out`'s tables from `news`' items `take`."""
    if "match" in out:
        width = out["match"].shape[1]
        for i, row in zip(take, r):
            out["match"][row] = match_ids(news.category[i], news.subcategory[i], news.entities(int(i)), width)
    if "entity_ids" in out:
        width = out["entity_ids"].shape[1]
        out["entity_ids"][r] = entity_ids(vocab, [news.entities(int(i)) for i in take], width)
    values = {"news_id": news.ids, "category": news.category, "subcategory": news.subcategory}
    for name in VOCAB_NAMES:
        if name in out:
            out[name][r] = vocab_ids(vocab, name, [values[name][i] for i in take])
    if "abstract" in out:
        out["abstract"][r] = _tokenize(tokenizer, [news.abstract[i] for i in take], abstract_len)
    if "title_entity" in out:
        assert titles is not None and vocab is not None
        ent_index = {v: i + 1 for i, v in enumerate(vocab.entities)}
        found = _entity_links(tokenizer, news, take, titles[r], ent_index, title_len)
        for i, row in zip(take, r):
            if int(i) in found:
                out["title_entity"][row] = align_entities(titles[row], *found[int(i)])


def build_tables(
    names: tuple[str, ...],
    news_list: list[News],
    rows_list: list[np.ndarray],
    store_arrays: dict,
    vocab: FeatureVocab | None,
    tokenizer,
    title_len: int,
    abstract_len: int = 50,
    match_width: int = 7,
) -> dict[str, np.ndarray]:
    """The tables `names` [R, ...] for the news of several splits (`rows_list[i]`: store rows of
    `news_list[i]`'s news, 0 = not in the store; a news in several splits is read from the first).
    `store_arrays` is the store's arrays (`input_ids`, `attn`), R = their length; `match_width`
    is F of the `match` table (and F - 2 the width of `entity_ids`)."""
    unknown = set(names) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown side input(s) {sorted(unknown)}; known: {', '.join(TABLES)}")
    if VOCAB_TABLES & set(names) and vocab is None:
        raise ValueError(f"side inputs {sorted(VOCAB_TABLES & set(names))} need the feature vocabulary")
    R = len(store_arrays["input_ids"])
    out: dict[str, np.ndarray] = {}
    titles = None
    if {"title_ids", "title_entity"} & set(names):
        titles = title_ids(
            np.asarray(store_arrays["input_ids"]),
            np.asarray(store_arrays["attn"]),
            title_len,
            tokenizer.sep_token_id,
        )
        titles[0] = 0
        if "title_ids" in names:
            out["title_ids"] = titles
    for name in ("news_id", "category", "subcategory"):
        if name in names:
            out[name] = np.zeros(R, np.int64)
    if "title_entity" in names:
        out["title_entity"] = np.zeros((R, title_len), np.int64)
    if "abstract" in names:
        out["abstract"] = np.zeros((R, abstract_len), np.int64)
    if "match" in names:
        out["match"] = np.zeros((R, match_width), np.int64)
    if "entity_ids" in names:
        out["entity_ids"] = np.zeros((R, match_width - 2), np.int64)
    filled = np.zeros(R, bool)
    filled[0] = True
    for news, rows in zip(news_list, rows_list):
        take = np.flatnonzero(~filled[rows])  # this split's news not read from an earlier split
        filled[rows[take]] = True
        if len(take):
            _fill(out, news, take, rows[take], vocab, tokenizer, titles, title_len, abstract_len)
    return out
