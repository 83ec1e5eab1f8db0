"""The news store: every news encoded once, fp16 on disk, memory-mapped, appendable.

A store is a folder of segments; `meta.json` lists the complete ones (with each one's row count
and file sizes) and is replaced atomically, so a crash while appending leaves the store readable
with its previous contents:

    meta.json            kind, encoder fingerprint, L, D, segments, segment_info (written last)
    seg-00000/           ids.txt, news.jsonl (category, subcategory, entities, title, added time), arrays:
      kind "vectors":    cls [n, D], tokens [n, L, D], pool [n, D] = mean of tokens (fp16), mask [n, L]
      kind "lower":      hidden [n, S, D] (fp16) = states below the top k layers
      kind "tokens":     nothing more (full fine-tuning encodes during training)
      every kind:        input_ids [n, S] (int32), attn [n, S] (bool)
    seg-00001/ ...       later appends; an id appended again supersedes its earlier row
    .lock                writers hold an exclusive flock on it: one append at a time, across processes
    .pending             the segment an append is writing, until meta.json lists it

Segments are memory-mapped and never concatenated (`Segmented` views them as one array), so an
append costs O(new news). A writer re-reads meta.json under the lock, so it never works from a
stale list; the only thing it ever deletes is the segment named in `.pending` by a writer that
died before committing it (the lock proves that writer is gone). Opening checks every segment's
counts and recorded sizes; `verify` reads everything.

Global row 0 (the first row of seg-00000) is the null news: zeros and an all-false mask, for
padding and ids missing from news.tsv. Stores built for training are keyed by encoder +
tokenizer + L + the news themselves, so a rerun reuses one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rmbert.encoders.bert import BertNewsEncoder, mean_pool, tokenize_titles

STORE_VERSION = 2
KIND_ARRAYS = {"vectors": ["cls", "tokens", "mask", "pool"], "lower": ["hidden"], "tokens": []}
KEY_SALT = "pool"  # bumps training-store cache keys when the arrays of a kind change


def cache_dir() -> Path:
    return Path(os.environ.get("RMBERT_CACHE", Path.home() / ".cache" / "rmbert"))


def encoder_fingerprint(encoder: BertNewsEncoder, tokenizer) -> str:
    """Hash of the encoder's weights and the tokenizer's vocabulary: equal hash, equal vectors.
    Kept on the encoder while its weights are unchanged (a frozen serving encoder hashes once)."""
    version = sum(p._version for p in encoder.parameters())
    cached = getattr(encoder, "_rmbert_fingerprint", None)
    if cached is not None and cached[:2] == (id(tokenizer), version):
        return cached[2]
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    fp = h.hexdigest()[:20]
    encoder._rmbert_fingerprint = (id(tokenizer), version, fp)
    return fp


@dataclass
class Encoding:
    """An encoder with its tokenizer and their fingerprint: what a store's vectors came from."""

    encoder: BertNewsEncoder
    tokenizer: object
    fingerprint: str

    @classmethod
    def of(cls, encoder: BertNewsEncoder, tokenizer) -> Encoding:
        return cls(encoder, tokenizer, encoder_fingerprint(encoder, tokenizer))


def store_key(
    fingerprint: str, kind: str, k: int, max_title_len: int, ids: list[str], titles: list[str]
) -> str:
    h = hashlib.sha256(f"{STORE_VERSION}|{KEY_SALT}|{fingerprint}|{kind}|{k}|{max_title_len}".encode())
    for nid, t in zip(ids, titles):
        h.update(f"{nid}\t{t}\n".encode())
    return h.hexdigest()[:24]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crash_point(name: str) -> None:
    """Test hook: exit abruptly at a named point of an append (RMBERT_CRASH_AT=name)."""
    if os.environ.get("RMBERT_CRASH_AT") == name:
        os._exit(86)


def _write_segment(
    folder: Path,
    *,
    ids: list[str],
    titles: list[str],
    info: list[dict],
    enc: Encoding,
    kind: str,
    k: int,
    null_row: bool,
    batch_size: int,
    progress: bool,
) -> dict:
    """Encode into a new segment folder; returns its record for meta.json (row count, file sizes)."""
    if kind not in KIND_ARRAYS:
        raise ValueError(f"unknown store kind {kind!r}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    L = enc.encoder.max_title_len
    input_ids, attn = tokenize_titles(enc.tokenizer, ([""] if null_row else []) + list(titles), L)  # [n, S]
    if null_row:
        input_ids[0], attn[0] = 0, False
    mm = _allocate(folder, kind, len(input_ids), L, enc.encoder.dim)
    mm["input_ids"][:] = input_ids.numpy()
    mm["attn"][:] = attn.numpy()
    if kind != "tokens":
        _encode_rows(mm, enc.encoder, input_ids, attn, kind, k, 1 if null_row else 0, batch_size, progress)
    for a in mm.values():
        a.flush()
    (folder / "ids.txt").write_text("\n".join(ids), encoding="utf-8")
    now = time.time()
    with open(folder / "news.jsonl", "w", encoding="utf-8") as f:
        for nid, t, extra in zip(ids, titles, info):
            f.write(json.dumps({"id": nid, "title": t, "added": now, **extra}) + "\n")
    return _sync(folder, len(ids))


def _allocate(folder: Path, kind: str, n: int, L: int, D: int) -> dict[str, np.ndarray]:
    """The segment's arrays, memory-mapped .npy files of n rows."""
    S = L + 2
    shapes = {"input_ids": ((n, S), np.int32), "attn": ((n, S), np.bool_)}
    if kind == "vectors":
        shapes |= {
            "cls": ((n, D), np.float16),
            "tokens": ((n, L, D), np.float16),
            "mask": ((n, L), np.bool_),
            "pool": ((n, D), np.float16),
        }
    elif kind == "lower":
        shapes["hidden"] = ((n, S, D), np.float16)
    return {name: _open(folder, name, shape, dtype) for name, (shape, dtype) in shapes.items()}


@torch.no_grad()
def _encode_rows(
    mm, encoder, input_ids, attn, kind: str, k: int, first: int, batch_size: int, progress: bool
):
    """Fill the vectors (or lower-layer states) of rows first.. in order of title length, so each
    batch pads only to its own longest title."""
    order = np.argsort(attn[first:].sum(1).numpy(), kind="stable") + first
    was_training = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    for start in tqdm(
        range(0, len(order), batch_size), desc="encoding news", unit="batch", disable=not progress
    ):
        rows = order[start : start + batch_size]
        b_ids, b_attn = input_ids[rows].to(dev), attn[rows].to(dev)
        if kind == "vectors":
            r = encoder(b_ids, b_attn)
            mm["cls"][rows] = r.cls.float().cpu().numpy().astype(np.float16)
            mm["tokens"][rows] = r.tokens.float().cpu().numpy().astype(np.float16)
            mm["mask"][rows] = r.mask.cpu().numpy()
            mm["pool"][rows] = mean_pool(r.tokens.float(), r.mask).cpu().numpy().astype(np.float16)
        else:
            s = int(b_attn.sum(1).max())
            h = encoder.lower(b_ids[:, :s], b_attn[:, :s], k)
            mm["hidden"][rows, :s] = h.float().cpu().numpy().astype(np.float16)
    encoder.train(was_training)


def _sync(folder: Path, n: int) -> dict:
    """fsync every file and the folder; the segment's record (row count, file sizes)."""
    sizes = {}
    for p in sorted(folder.iterdir()):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        sizes[p.name] = p.stat().st_size
    _fsync_dir(folder)
    return {"n": n, "bytes": sizes}


def _open(folder: Path, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


class StoreError(ValueError):
    """A damaged or unreadable news store; the message names the file."""


class Segmented:
    """Rows of several segment arrays seen as one array, without copying them: `a[rows]`,
    `a[rows, ...]`, `a[i:j]` and `len(a)` gather from the segments that hold the rows."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[s][(i - self.offsets[s], *rest)]
        rows = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key, np.int64)
        flat = rows.reshape(-1)
        seg = np.searchsorted(self.offsets, flat, side="right") - 1
        tail = self.parts[0][(np.zeros(0, np.int64), *rest)].shape[1:]
        out = np.empty((len(flat), *tail), self.dtype)
        for s in np.unique(seg):
            m = seg == s
            out[m] = self.parts[s][(flat[m] - self.offsets[s], *rest)]
        return out.reshape(*rows.shape, *tail)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out.astype(dtype) if dtype is not None else out


def _join(parts: list[np.ndarray]):
    return parts[0] if len(parts) == 1 else Segmented(parts)


@contextmanager
def writer_lock(path: Path, timeout: float = 120.0):
    """Exclusive, cross-process: one writer of the store at a time (released if the holder dies)."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{path / '.lock'}: another writer has held the store for {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_meta(path: Path) -> dict:
    f = path / "meta.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a news store (no meta.json)")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{f}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
        v = meta.get("version") if isinstance(meta, dict) else None
        raise StoreError(f"{f}: store version {v} (this rmbert reads {STORE_VERSION}); re-encode")
    for key in ("kind", "arrays", "segments"):
        if key not in meta:
            raise StoreError(f"{f}: no {key!r}")
    return meta


@dataclass
class Segment:
    """One loaded segment: its ids, their info, and its memory-mapped arrays."""

    name: str
    ids: list[str]
    info: list[dict]
    arrays: dict[str, np.ndarray]


def load_segment(path: Path, meta: dict, name: str, first: bool) -> Segment:
    """Open one segment, checking that ids.txt, news.jsonl, the arrays and meta.json agree."""
    d = path / name
    recorded = meta.get("segment_info", {}).get(name)
    if recorded:
        for fname, size in recorded.get("bytes", {}).items():
            f = d / fname
            actual = f.stat().st_size if f.is_file() else None
            if actual != size:
                raise StoreError(
                    f"{f}: {'missing' if actual is None else f'{actual} bytes'}, meta.json records {size}"
                )
    try:
        text = (d / "ids.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{d / 'ids.txt'}: unreadable ({e})") from None
    ids = text.split("\n") if text else []
    info: list[dict] = []
    try:
        with open(d / "news.jsonl", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    info.append(json.loads(line))
                except ValueError:
                    raise StoreError(f"{d / 'news.jsonl'}:{lineno}: not a JSON object") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{d / 'news.jsonl'}: unreadable ({e})") from None
    n = len(ids)
    if recorded and recorded.get("n") != n:
        raise StoreError(f"{d / 'ids.txt'}: {n} ids, meta.json records {recorded.get('n')}")
    if len(info) != n:
        raise StoreError(f"{d / 'news.jsonl'}: {len(info)} lines for {n} ids in ids.txt")
    for i, (nid, row) in enumerate(zip(ids, info)):
        if not isinstance(row, dict) or row.get("id", nid) != nid:
            raise StoreError(
                f"{d / 'news.jsonl'}:{i + 1}: id does not match line {i + 1} of ids.txt ({nid!r})"
            )
    rows = n + (1 if first else 0)
    names = list(meta["arrays"])
    if meta["kind"] == "vectors" and "pool" not in names:
        names.append("pool")  # stores written before the pool array: computed below
    arrays: dict[str, np.ndarray] = {}
    for a in names:
        f = d / f"{a}.npy"
        if a == "pool" and not f.is_file() and "tokens" in arrays:
            arrays[a] = _mean_pool_array(arrays["tokens"], arrays["mask"])
            continue
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{f}: unreadable ({e})") from None
        if len(arr) != rows:
            raise StoreError(f"{f}: {len(arr)} rows for {n} ids in ids.txt")
        arrays[a] = arr
    return Segment(name, ids, info, arrays)


def _mean_pool_array(tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros((len(tok), tok.shape[2]), np.float16)
    for s in range(0, len(tok), 4096):
        t = torch.from_numpy(np.asarray(tok[s : s + 4096], dtype=np.float32))
        out[s : s + 4096] = mean_pool(t, torch.from_numpy(np.array(mask[s : s + 4096]))).numpy()
    return out


@dataclass
class NewsStore:
    path: Path
    meta: dict
    ids: list[str]  # global row r + 1 holds ids[r] (row 0 is the null news)
    arrays: dict[str, np.ndarray]  # a memmap, or a `Segmented` view over the segments' memmaps
    info: list[dict] = field(default_factory=list)  # per id: title, category, subcategory, added
    index: dict[str, int] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {nid: i + 1 for i, nid in enumerate(self.ids)}  # later rows supersede

    @classmethod
    def open(cls, path: str | Path) -> NewsStore:
        path = Path(path)
        meta = read_meta(path)
        segs = [load_segment(path, meta, name, i == 0) for i, name in enumerate(meta["segments"])]
        return cls._of(path, meta, segs)

    @classmethod
    def _of(cls, path: Path, meta: dict, segs: list[Segment], base: NewsStore | None = None) -> NewsStore:
        """A store of `segs`; with `base`, segs extend base's segments (its ids, info, index reused)."""
        if not segs:
            raise StoreError(f"{path / 'meta.json'}: lists no segments")
        new = segs[len(base.segments) :] if base else segs
        ids = (list(base.ids) if base else []) + [i for s in new for i in s.ids]
        info = (list(base.info) if base else []) + [r for s in new for r in s.info]
        index = dict(base.index) if base else {}
        r = len(base.ids) if base else 0
        for s in new:
            for nid in s.ids:
                r += 1
                index[nid] = r
        arrays = {a: _join([s.arrays[a] for s in segs]) for a in segs[0].arrays}
        return cls(path, meta, ids, arrays, info, index, segs)

    def __len__(self) -> int:
        return len(self.ids)

    def release(self, names: tuple[str, ...] = ("tokens", "hidden")) -> None:
        """Take the pages of the arrays `names` (those the store has) out of this process's
        resident memory (madvise DONTNEED on their read-only maps): they stay in the page cache,
        and a later read maps them back without reading the disk. For a pass that reads each
        row once, such as the news terms of a whole split, so that its resident memory does not
        grow by the store's size. Nothing happens where the platform has no madvise."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for arr in (self.arrays[k] for k in names if k in self.arrays):
            for part in arr.parts if isinstance(arr, Segmented) else [arr]:
                mm = getattr(part, "_mmap", None)  # an np.memmap's map (None for arrays in memory)
                if mm is None or getattr(part, "mode", None) != "r":  # never drop a private copy's writes
                    continue
                try:
                    mm.madvise(mmap.MADV_DONTNEED)
                except OSError:  # e.g. locked pages: they simply stay
                    pass

    def pooled(self) -> np.ndarray:
        """[rows, D] mean of each news's title-token vectors (computed on open for stores written
        before the pool array existed)."""
        return self.arrays["pool"]

    def refresh(self) -> NewsStore:
        """This store with the segments other writers committed since it was read (self if none)."""
        meta = read_meta(self.path)
        have = [s.name for s in self.segments]
        if meta["segments"] == have:
            return self
        if meta.get("uid") != self.meta.get("uid") or meta["segments"][: len(have)] != have:
            return NewsStore.open(self.path)  # rebuilt under us: read it afresh
        new = [load_segment(self.path, meta, name, False) for name in meta["segments"][len(have) :]]
        return NewsStore._of(self.path, meta, self.segments + new, base=self)

    @property
    def live_ids(self) -> list[str]:
        """Distinct ids, each at its latest row."""
        return [nid for nid, r in self.index.items()]

    def rows(self, news_ids: list[str]) -> np.ndarray:
        """Store rows of news ids (0 for ids the store lacks)."""
        return np.array([self.index.get(n, 0) for n in news_ids], dtype=np.int64)

    def append(
        self,
        ids: list[str],
        titles: list[str],
        enc: Encoding,
        *,
        info: list[dict] | None = None,
        progress: bool = False,
    ) -> NewsStore:
        """Encode and append news durably under the writer lock; returns the store with every
        segment committed so far, other writers' included (self is unchanged)."""
        if self.meta.get("encoder") and self.meta["encoder"] != enc.fingerprint:
            raise ValueError(f"{self.path}: built with another encoder; appending would mix vector spaces")
        with writer_lock(self.path):
            cur = self.refresh()  # never work from a stale segment list
            _clean_pending(self.path, cur.meta)
            segs = cur.meta["segments"]
            k = len(segs)
            while (self.path / f"seg-{k:05d}").exists():  # a folder we know nothing of: never touch it
                k += 1
            name = f"seg-{k:05d}"
            _write_json_atomic(self.path / ".pending", {"segment": name, "pid": os.getpid()})
            try:
                record = _write_segment(
                    self.path / name,
                    ids=ids,
                    titles=titles,
                    info=info or [{} for _ in ids],
                    enc=enc,
                    kind=cur.meta["kind"],
                    k=cur.meta.get("k", 0),
                    null_row=False,
                    batch_size=64,
                    progress=progress,
                )
                _crash_point("before_meta")
                meta = {
                    **cur.meta,
                    "segments": [*segs, name],
                    "segment_info": {**cur.meta.get("segment_info", {}), name: record},
                }
                _write_json_atomic(self.path / "meta.json", meta)
            except BaseException:
                shutil.rmtree(self.path / name, ignore_errors=True)  # our own unfinished segment
                raise
            (self.path / ".pending").unlink(missing_ok=True)
            seg = load_segment(self.path, meta, name, False)
            return NewsStore._of(self.path, meta, cur.segments + [seg], base=cur)

    def verify(self) -> dict:
        """Read every array in full: finite vectors, token masks within L, ids unique per segment,
        no segment folders that meta.json does not list. Raises StoreError; returns a summary."""
        for s in self.segments:
            for a, arr in s.arrays.items():
                for start in range(0, len(arr), 8192):
                    block = np.asarray(arr[start : start + 8192])
                    if block.dtype.kind == "f" and not np.isfinite(block).all():
                        raise StoreError(f"{self.path / s.name / (a + '.npy')}: non-finite values")
            if len(set(s.ids)) != len(s.ids):
                raise StoreError(f"{self.path / s.name / 'ids.txt'}: an id appears twice")
        listed = set(self.meta["segments"])
        orphans = sorted(p.name for p in self.path.glob("seg-*") if p.name not in listed)
        return {
            "store": str(self.path),
            "ok": True,
            "news": len(self.index),
            "rows": len(self.ids),
            "segments": len(self.segments),
            "unlisted_folders": orphans,
        }


def _clean_pending(path: Path, meta: dict) -> None:
    """Under the writer lock: remove the segment a dead writer named in `.pending` but never committed."""
    f = path / ".pending"
    if not f.is_file():
        return
    try:
        name = json.loads(f.read_text()).get("segment", "")
    except (OSError, ValueError):
        name = ""
    if name.startswith("seg-") and "/" not in name and name not in meta["segments"]:
        shutil.rmtree(path / name, ignore_errors=True)
    f.unlink(missing_ok=True)


def build_store(
    out: str | Path,
    ids: list[str],
    titles: list[str],
    enc: Encoding,
    *,
    kind: str = "vectors",
    k: int = 0,
    batch_size: int = 128,
    progress: bool = True,
    info: list[dict] | None = None,
) -> NewsStore:
    """Encode `titles` into a new store at `out` (built beside it, then renamed into place)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    record = _write_segment(
        tmp / "seg-00000",
        ids=ids,
        titles=titles,
        info=info or [{} for _ in ids],
        enc=enc,
        kind=kind,
        k=k,
        null_row=True,
        batch_size=batch_size,
        progress=progress,
    )
    meta = {
        "version": STORE_VERSION,
        "kind": kind,
        "k": k,
        "max_title_len": enc.encoder.max_title_len,
        "dim": enc.encoder.dim,
        "arrays": ["input_ids", "attn", *KIND_ARRAYS[kind]],
        "segments": ["seg-00000"],
        "segment_info": {"seg-00000": record},
        "uid": os.urandom(8).hex(),  # a rebuilt store is a new store
        "encoder": enc.fingerprint,
    }
    _write_json_atomic(tmp / "meta.json", meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return NewsStore.open(out)


def cached_store(
    ids: list[str],
    titles: list[str],
    enc: Encoding,
    *,
    kind: str = "vectors",
    k: int = 0,
    root: Path | None = None,
    progress: bool = True,
) -> NewsStore:
    """The store for these news under this encoder, built once and reused by later runs."""
    key = store_key(enc.fingerprint, kind, k, enc.encoder.max_title_len, ids, titles)
    path = (root or cache_dir() / "stores") / key
    if (path / "meta.json").is_file():
        return NewsStore.open(path)
    return build_store(path, ids, titles, enc, kind=kind, k=k, progress=progress)
