"""MIND format: parse and validate `news.tsv` and `behaviors.tsv` into array-backed tables.

Impressions are stored column-wise in numpy arrays with CSR offsets (no Python object per
candidate row), so MIND-large (2.2M impressions, 83M candidate rows) fits in memory.
Malformed input raises `MindFormatError`, whose message is `file:line: what is wrong`.
"""

from __future__ import annotations

import calendar
import json
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NEWS_COLUMNS = 8  # id, category, subcategory, title, abstract, url, title_entities, abstract_entities
BEHAVIOR_COLUMNS = 5  # impression id, user id, time, history, impressions
_TIME = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4}) (\d{1,2}):(\d{2}):(\d{2}) ([AP]M)$")


class MindFormatError(ValueError):
    """A malformed MIND file; `str()` names the file and the 1-based line."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}:{line}: {message}")


def read_lines(path: str | Path) -> Iterator[str]:
    """The lines of a text file, streamed (one line in memory at a time, so a multi-GB
    behaviors.tsv costs only its parsed columns): UTF-8 (with or without BOM), LF or CRLF,
    trailing newline optional."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MindFormatError(
                        path, lineno, f"not valid UTF-8 (byte {raw[e.start]:#04x})"
                    ) from None
                yield line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
    except OSError as e:
        raise MindFormatError(path, 0, f"cannot read file: {e.strerror or e}") from e


def read_rows(path: str | Path, columns: int):
    """(1-based line number, columns) of every non-blank line of a tab-separated file, each
    checked to have `columns` columns."""
    path = Path(path)
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != columns:
            raise MindFormatError(path, lineno, f"expected {columns} tab-separated columns, got {len(cols)}")
        yield lineno, cols


@dataclass
class Entities:
    """Entity columns of news.tsv as CSR arrays: news `i` links `names[ids[ptr[i]:ptr[i+1]]]`
    (WikidataIds, in file order, each once per news), with no Python object per row."""

    ptr: np.ndarray  # [N+1] int64
    ids: np.ndarray  # [links] int32 into names
    names: list[str]  # distinct WikidataIds of the table
    # per link: its mentions in the text, (surface form, character offset or -1 where MIND's
    # OccurrenceOffsets does not give it); the Label at -1 for a link without SurfaceForms
    forms: list[tuple[tuple[str, int], ...]] | None = None

    def of(self, i: int) -> list[str]:
        return [self.names[j] for j in self.ids[self.ptr[i] : self.ptr[i + 1]]]

    def mentions(self, i: int) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
        """(WikidataId, its mentions) of news `i`'s links: where and how the text names each entity."""
        lo, hi = int(self.ptr[i]), int(self.ptr[i + 1])
        return [(self.names[self.ids[k]], self.forms[k] if self.forms else ()) for k in range(lo, hi)]


def _empty_entities(n: int) -> Entities:
    return Entities(np.zeros(n + 1, np.int64), np.zeros(0, np.int32), [])


@dataclass
class News:
    """The news table of one split, row `i` is news `ids[i]`."""

    ids: list[str]
    category: list[str]
    subcategory: list[str]
    title: list[str]
    abstract: list[str]
    index: dict[str, int] = field(default_factory=dict)
    title_entities: Entities | None = None  # None: built empty (no entity columns given)
    abstract_entities: Entities | None = None

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {nid: i for i, nid in enumerate(self.ids)}
        if self.title_entities is None:
            self.title_entities = _empty_entities(len(self.ids))
        if self.abstract_entities is None:
            self.abstract_entities = _empty_entities(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def entities(self, i: int) -> list[str]:
        """WikidataIds of news `i`: its title's, then its abstract's not already named."""
        assert self.title_entities is not None and self.abstract_entities is not None
        return list(dict.fromkeys(self.title_entities.of(i) + self.abstract_entities.of(i)))


class _EntityReader:
    """Parses MIND entity columns (a JSON list of objects with a WikidataId) into shared CSR arrays."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.cols: dict[str, tuple[array, array]] = {}
        self.forms: dict[str, list[tuple[tuple[str, int], ...]]] = {}  # per column, per link: its mentions

    def add(self, path: Path, lineno: int, name: str, value: str) -> None:
        ptr, ids = self.cols.setdefault(name, (array("q", [0]), array("i")))
        forms = self.forms.setdefault(name, [])
        v = value.strip()
        if v and v != "[]":
            try:
                items = json.loads(v)
            except json.JSONDecodeError as e:
                raise MindFormatError(path, lineno, f"{name} is not valid JSON ({e.msg})") from None
            if not isinstance(items, list):
                raise MindFormatError(path, lineno, f"{name} is not a JSON list")
            seen: dict[int, int] = {}  # entity -> its link's position in `forms`
            for item in items:
                qid = item.get("WikidataId") if isinstance(item, dict) else None
                if not isinstance(qid, str) or not qid.strip():
                    raise MindFormatError(path, lineno, f"{name}: an entity without a WikidataId string")
                j = self.names.setdefault(qid.strip(), len(self.names))
                if j not in seen:
                    seen[j] = len(forms)
                    ids.append(j)
                    forms.append(())
                forms[seen[j]] += _surface_forms(item)
        ptr.append(len(ids))

    def table(self, name: str, n: int) -> Entities:
        if name not in self.cols:
            return _empty_entities(n)
        ptr, ids = self.cols[name]
        return Entities(
            np.frombuffer(ptr, dtype=np.int64).copy(),
            np.frombuffer(ids, dtype=np.int32).copy(),
            list(self.names),
            self.forms[name],
        )


def _surface_forms(item: dict) -> tuple[tuple[str, int], ...]:
    """An entity link's mentions: its SurfaceForms (the words of the text that name it) with
    their OccurrenceOffsets where both lists agree (else -1), or its Label at -1."""
    forms, offsets = item.get("SurfaceForms"), item.get("OccurrenceOffsets")
    forms = forms if isinstance(forms, list) else []
    if not (isinstance(offsets, list) and len(offsets) == len(forms)):
        offsets = [-1] * len(forms)
    got = tuple(
        (f, o if isinstance(o, int) and not isinstance(o, bool) and o >= 0 else -1)
        for f, o in zip(forms, offsets)
        if isinstance(f, str) and f.strip()
    )
    label = item.get("Label")
    return got or (((label, -1),) if isinstance(label, str) and label.strip() else ())


def load_news(path: str | Path) -> News:
    path = Path(path)
    ids: list[str] = []
    cat: list[str] = []
    sub: list[str] = []
    title: list[str] = []
    abstract: list[str] = []
    index: dict[str, int] = {}
    first_line: dict[str, int] = {}
    entities = _EntityReader()
    for lineno, cols in read_rows(path, NEWS_COLUMNS):
        nid = cols[0].strip()
        if not nid:
            raise MindFormatError(path, lineno, "empty news id")
        if nid in index:
            raise MindFormatError(
                path, lineno, f"duplicate news id {nid!r} (first on line {first_line[nid]})"
            )
        first_line[nid] = lineno
        entities.add(path, lineno, "title_entities", cols[6])
        entities.add(path, lineno, "abstract_entities", cols[7])
        index[nid] = len(ids)
        ids.append(nid)
        cat.append(cols[1])
        sub.append(cols[2])
        title.append(cols[3])
        abstract.append(cols[4])
    n = len(ids)
    return News(
        ids,
        cat,
        sub,
        title,
        abstract,
        index,
        entities.table("title_entities", n),
        entities.table("abstract_entities", n),
    )


@dataclass
class Impressions:
    """Impression logs of one split, column-wise.

    Impression `i` has history `hist[hist_ptr[i]:hist_ptr[i+1]]` (news rows, oldest first,
    ids missing from news.tsv dropped) and candidates `cand[cand_ptr[i]:cand_ptr[i+1]]`
    (news rows, -1 where the id is missing) with `labels` (1/0, or -1 in a test split).
    """

    imp_ids: np.ndarray  # [I] int64
    users: list[str]  # distinct user ids
    user_idx: np.ndarray  # [I] int32 into users
    times: np.ndarray  # [I] int64, seconds since the epoch
    hist_ptr: np.ndarray  # [I+1] int64
    hist: np.ndarray  # [sum of history lengths] int32
    cand_ptr: np.ndarray  # [I+1] int64
    cand: np.ndarray  # [candidate rows] int32, -1 = missing from news.tsv
    labels: np.ndarray  # [candidate rows] int8, -1 = unlabeled
    missing_cand_at: dict[int, str] | None = None  # candidate row (-1 in `cand`) -> its id
    empty_histories: int = 0
    missing_history_refs: int = 0
    missing_history_ids: set[str] = field(default_factory=set)
    missing_candidate_ids: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.imp_ids)

    @property
    def has_labels(self) -> bool:
        return len(self.labels) == 0 or bool(self.labels[0] >= 0)

    def subset(self, rows: np.ndarray) -> Impressions:
        """The impressions at `rows` (in that order), sharing nothing mutable with self."""
        rows = np.asarray(rows, dtype=np.int64)
        hp, hist = _gather_csr(self.hist_ptr, self.hist, rows)
        cp, cand = _gather_csr(self.cand_ptr, self.cand, rows)
        _, labels = _gather_csr(self.cand_ptr, self.labels, rows)
        return Impressions(
            self.imp_ids[rows], self.users, self.user_idx[rows], self.times[rows], hp, hist, cp, cand, labels
        )


def _gather_csr(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = ptr[rows + 1] - ptr[rows]
    new_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_ptr[1:])
    starts = np.repeat(ptr[rows] - new_ptr[:-1], lengths)
    return new_ptr, values[starts + np.arange(new_ptr[-1])]


_day_cache: dict[tuple[int, int, int], int] = {}


def parse_time(value: str) -> int | None:
    """`11/15/2019 8:55:22 AM` -> seconds since the epoch (UTC), or None if malformed."""
    m = _TIME.match(value.strip())
    if m is None:
        return None
    mo, d, y, h, mi, s, ampm = m.groups()
    mo_i, d_i, y_i, h_i, mi_i, s_i = int(mo), int(d), int(y), int(h), int(mi), int(s)
    if not (1 <= mo_i <= 12 and 1 <= d_i <= 31 and 1 <= h_i <= 12 and mi_i < 60 and s_i < 60):
        return None
    key = (y_i, mo_i, d_i)
    day = _day_cache.get(key)
    if day is None:
        try:
            day = calendar.timegm((y_i, mo_i, d_i, 0, 0, 0))
            if calendar.monthrange(y_i, mo_i)[1] < d_i:
                return None
        except ValueError:
            return None
        _day_cache[key] = day
    hour = h_i % 12 + (12 if ampm == "PM" else 0)
    return day + hour * 3600 + mi_i * 60 + s_i


def format_time(ts: int) -> str:
    """Inverse of `parse_time`: MIND's `M/D/YYYY h:mm:ss AM` form."""
    import time

    t = time.gmtime(int(ts))
    h12 = t.tm_hour % 12 or 12
    ampm = "PM" if t.tm_hour >= 12 else "AM"
    return f"{t.tm_mon}/{t.tm_mday}/{t.tm_year} {h12}:{t.tm_min:02d}:{t.tm_sec:02d} {ampm}"


class _BehaviorsReader:
    """Accumulates behaviors.tsv rows into column arrays (one phase per column group)."""

    def __init__(self, path: Path, news: News) -> None:
        self.path, self.index = path, news.index
        self.imp_ids, self.user_idx, self.times = array("q"), array("i"), array("q")
        self.hist, self.hist_ptr = array("i"), array("q", [0])
        self.cand, self.cand_ptr, self.labels = array("i"), array("q", [0]), array("b")
        self.missing_at: dict[int, str] = {}  # candidate row -> its id, where news.tsv lacks it
        self.users: dict[str, int] = {}
        self.empty = self.missing_refs = 0
        self.missing_hist: set[str] = set()
        self.missing_cand: set[str] = set()
        self.labeled: bool | None = None
        self.seen_imp: dict[int, int] = {}

    def row(self, lineno: int, cols: list[str]) -> None:
        self.header(lineno, cols)
        self.history(cols[3])
        self.candidates(lineno, cols[4])

    def header(self, lineno: int, cols: list[str]) -> None:
        """Impression id (unique integer), user, time."""
        try:
            imp_id = int(cols[0])
        except ValueError:
            raise MindFormatError(self.path, lineno, f"impression id {cols[0]!r} is not an integer") from None
        if imp_id in self.seen_imp:
            first = self.seen_imp[imp_id]
            raise MindFormatError(
                self.path, lineno, f"duplicate impression id {imp_id} (first on line {first})"
            )
        self.seen_imp[imp_id] = lineno
        ts = parse_time(cols[2])
        if ts is None:
            raise MindFormatError(
                self.path, lineno, f"time {cols[2]!r} is not of the form M/D/YYYY h:mm:ss AM"
            )
        user = cols[1].strip()
        if not user:
            raise MindFormatError(self.path, lineno, "empty user id")
        self.imp_ids.append(imp_id)
        self.user_idx.append(self.users.setdefault(user, len(self.users)))
        self.times.append(ts)

    def history(self, text: str) -> None:
        """Clicked news, oldest first; ids missing from news.tsv are dropped and counted."""
        h_ids = text.split()
        if not h_ids:
            self.empty += 1
        rows = [self.index.get(h, -1) for h in h_ids]
        if -1 in rows:
            missing = [h for h, r in zip(h_ids, rows) if r < 0]
            self.missing_refs += len(missing)
            self.missing_hist.update(missing)
            rows = [r for r in rows if r >= 0]
        self.hist.extend(rows)
        self.hist_ptr.append(len(self.hist))

    def candidates(self, lineno: int, text: str) -> None:
        """`N1-1 N2-0 ...` (or ids without labels, in a test split: one or the other per file)."""
        toks = text.split()
        if not toks:
            raise MindFormatError(self.path, lineno, "impression has no candidates")
        if self.labeled is None:
            self.labeled = len(toks[0]) > 2 and toks[0][-2] == "-"
        if self.labeled:
            bad = next((t for t in toks if not (len(t) > 2 and t[-2] == "-" and t[-1] in "01")), None)
            if bad is not None:
                raise MindFormatError(
                    self.path, lineno, f"candidate {bad!r} is not of the form NewsId-0 or NewsId-1"
                )
            ids = [t[:-2] for t in toks]
            self.labels.extend([t[-1] == "1" for t in toks])
        else:
            bad = next((t for t in toks if "-" in t), None)
            if bad is not None:
                raise MindFormatError(
                    self.path,
                    lineno,
                    f"candidate {bad!r} has a label but earlier lines of this file have none",
                )
            ids = toks
            self.labels.extend([-1] * len(toks))
        rows = [self.index.get(c, -1) for c in ids]
        if -1 in rows:
            self.missing_cand.update(c for c, r in zip(ids, rows) if r < 0)
            first = len(self.cand)
            self.missing_at.update((first + j, c) for j, (c, r) in enumerate(zip(ids, rows)) if r < 0)
        self.cand.extend(rows)
        self.cand_ptr.append(len(self.cand))

    def finish(self) -> Impressions:
        def arr(a: array, dtype) -> np.ndarray:
            return np.frombuffer(a, dtype=dtype).copy()

        return Impressions(
            imp_ids=arr(self.imp_ids, np.int64),
            users=list(self.users),
            user_idx=arr(self.user_idx, np.int32),
            times=arr(self.times, np.int64),
            hist_ptr=arr(self.hist_ptr, np.int64),
            hist=arr(self.hist, np.int32),
            cand_ptr=arr(self.cand_ptr, np.int64),
            cand=arr(self.cand, np.int32),
            labels=arr(self.labels, np.int8),
            missing_cand_at=self.missing_at,
            empty_histories=self.empty,
            missing_history_refs=self.missing_refs,
            missing_history_ids=self.missing_hist,
            missing_candidate_ids=self.missing_cand,
        )


def load_impressions(path: str | Path, news: News) -> Impressions:
    """Parse behaviors.tsv against `news`; missing history ids are dropped and counted."""
    reader = _BehaviorsReader(Path(path), news)
    for lineno, cols in read_rows(path, BEHAVIOR_COLUMNS):
        reader.row(lineno, cols)
    return reader.finish()


@dataclass
class Split:
    """A MIND split folder: `news.tsv` + `behaviors.tsv`."""

    path: Path
    news: News
    impressions: Impressions


def load_entity_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """MIND's `entity_embedding.vec`: `WikidataId<TAB>v1<TAB>...<TAB>vd` per line (a trailing tab
    is allowed) -> ids and a float32 [n, d] array. Errors name the file and line."""
    path = Path(path)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path), 1):
        cols = line.strip().split("\t")
        if not cols[0]:
            continue
        try:
            vec = np.array(cols[1:], dtype=np.float32)
        except ValueError:
            raise MindFormatError(path, lineno, "a vector value is not a number") from None
        if len(vec) == 0 or (rows and len(vec) != len(rows[0])):
            want = len(rows[0]) if rows else "at least 1"
            raise MindFormatError(path, lineno, f"{len(vec)} values; expected {want}")
        if not np.isfinite(vec).all():
            raise MindFormatError(path, lineno, "non-finite value")
        if cols[0] in seen:
            raise MindFormatError(
                path, lineno, f"duplicate entity {cols[0]!r} (first on line {seen[cols[0]]})"
            )
        seen[cols[0]] = lineno
        ids.append(cols[0])
        rows.append(vec)
    return ids, (np.stack(rows) if rows else np.zeros((0, 0), np.float32))


def load_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.is_dir():
        raise MindFormatError(path, 0, "not a folder (a split is a folder with news.tsv and behaviors.tsv)")
    for name in ("news.tsv", "behaviors.tsv"):
        if not (path / name).is_file():
            raise MindFormatError(path / name, 0, "file not found")
    news = load_news(path / "news.tsv")
    return Split(path, news, load_impressions(path / "behaviors.tsv", news))


def summarize(split: Split, tokenizer=None, max_title_tokens: int = 30) -> dict:
    """The `rmbert data check` summary of a parsed split."""
    imps = split.impressions
    n_rows = len(imps.cand)
    clicks = int((imps.labels == 1).sum())
    out: dict = {
        "split": str(split.path),
        "news": len(split.news),
        "impressions": len(imps),
        "users": len(imps.users),
        "candidate_rows": n_rows,
        "labeled": imps.has_labels,
        "clicks": clicks if imps.has_labels else None,
        "ctr": round(clicks / n_rows, 6) if imps.has_labels and n_rows else None,
        "empty_histories": imps.empty_histories,
        "history_refs": int(len(imps.hist) + imps.missing_history_refs),
        "missing_history_refs": imps.missing_history_refs,
        "missing_history_ids_unique": len(imps.missing_history_ids),
        "missing_candidate_rows": int((imps.cand < 0).sum()),
        "missing_candidate_ids_unique": len(imps.missing_candidate_ids),
        "empty_abstracts": sum(1 for a in split.news.abstract if not a.strip()),
        "empty_titles": sum(1 for t in split.news.title if not t.strip()),
        "news_with_entities": _with_entities(split.news),
        "entities_unique": len(split.news.title_entities.names),
    }
    if len(imps):
        hl = np.diff(imps.hist_ptr)
        cl = np.diff(imps.cand_ptr)
        out["history_length"] = _percentiles(hl)
        out["candidates_per_impression"] = _percentiles(cl)
        out["time_range"] = [format_time(int(imps.times.min())), format_time(int(imps.times.max()))]
    if tokenizer is not None and len(split.news):
        lengths = np.array(
            [len(x) for x in tokenizer(split.news.title, add_special_tokens=False)["input_ids"]]
        )
        out["title_tokens"] = _percentiles(lengths)
        out[f"titles_truncated_at_{max_title_tokens}"] = int((lengths > max_title_tokens).sum())
    warnings = []
    if imps.missing_history_refs:
        warnings.append(
            f"{imps.missing_history_refs} history references to {len(imps.missing_history_ids)} news ids "
            "not in news.tsv were dropped"
        )
    if imps.missing_candidate_ids:
        warnings.append(
            f"{out['missing_candidate_rows']} candidate rows name {len(imps.missing_candidate_ids)} news ids "
            "not in news.tsv (scored as empty news)"
        )
    out["warnings"] = warnings
    return out


def _with_entities(news: News) -> int:
    t, a = news.title_entities, news.abstract_entities
    return int(((np.diff(t.ptr) > 0) | (np.diff(a.ptr) > 0)).sum())


def _percentiles(x: np.ndarray) -> dict:
    p = np.percentile(x, [50, 90, 99]) if len(x) else [0, 0, 0]
    return {
        "mean": round(float(np.mean(x)), 3) if len(x) else 0,
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p99": float(p[2]),
        "max": int(np.max(x)) if len(x) else 0,
    }
