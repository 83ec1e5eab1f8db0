"""The news store: every news encoded once, fp16 on disk, memory-mapped, appendable.

A store is a folder of segments; `meta.json` lists the complete ones and is replaced
atomically, so a crash while appending leaves the store readable with its previous contents:

    meta.json            kind, encoder fingerprint, L, D, segments (written last)
    seg-00000/           ids.txt, news.jsonl (category, subcategory, title, added time) and arrays:
      kind "vectors":    cls [n, D], tokens [n, L, D], pool [n, D] = mean of tokens (fp16), mask [n, L]
      kind "lower":      hidden [n, S, D] (fp16) = states below the top k layers
      kind "tokens":     nothing more (full fine-tuning encodes during training)
      every kind:        input_ids [n, S] (int32), attn [n, S] (bool)
    seg-00001/ ...       later appends; an id appended again supersedes its earlier row

Global row 0 (the first row of seg-00000) is the null news: zeros and an all-false mask, for
padding and ids missing from news.tsv. Stores built for training are keyed by encoder +
tokenizer + L + the news themselves, so a rerun reuses one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
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
    """Hash of the encoder's weights and the tokenizer's vocabulary: equal hash, equal vectors."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:20]


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


@torch.no_grad()
def _write_segment(
    folder: Path,
    ids: list[str],
    titles: list[str],
    info: list[dict],
    encoder: BertNewsEncoder,
    tokenizer,
    kind: str,
    k: int,
    null_row: bool,
    batch_size: int,
    progress: bool,
) -> None:
    if kind not in KIND_ARRAYS:
        raise ValueError(f"unknown store kind {kind!r}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    L = encoder.max_title_len
    S, D = L + 2, encoder.dim
    pre = [""] if null_row else []
    input_ids, attn = tokenize_titles(tokenizer, pre + list(titles), L)  # [n, S]
    if null_row:
        input_ids[0], attn[0] = 0, False
    n = len(input_ids)
    mm = {
        "input_ids": _open(folder, "input_ids", (n, S), np.int32),
        "attn": _open(folder, "attn", (n, S), np.bool_),
    }
    mm["input_ids"][:] = input_ids.numpy()
    mm["attn"][:] = attn.numpy()
    if kind == "vectors":
        mm["cls"] = _open(folder, "cls", (n, D), np.float16)
        mm["tokens"] = _open(folder, "tokens", (n, L, D), np.float16)
        mm["mask"] = _open(folder, "mask", (n, L), np.bool_)
        mm["pool"] = _open(folder, "pool", (n, D), np.float16)
    elif kind == "lower":
        mm["hidden"] = _open(folder, "hidden", (n, S, D), np.float16)
    first = 1 if null_row else 0
    # Encode in order of length so each batch pads only to its own longest title.
    order = np.argsort(attn[first:].sum(1).numpy(), kind="stable") + first
    if kind == "tokens":
        order = order[:0]
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
    for a in mm.values():
        a.flush()
    (folder / "ids.txt").write_text("\n".join(ids), encoding="utf-8")
    now = time.time()
    with open(folder / "news.jsonl", "w", encoding="utf-8") as f:
        for nid, t, extra in zip(ids, titles, info):
            f.write(json.dumps({"id": nid, "title": t, "added": now, **extra}) + "\n")
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _open(folder: Path, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


@dataclass
class NewsStore:
    path: Path
    meta: dict
    ids: list[str]  # global row r + 1 holds ids[r] (row 0 is the null news)
    arrays: dict[str, np.ndarray]
    info: list[dict] = field(default_factory=list)  # per id: title, category, subcategory, added
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {nid: i + 1 for i, nid in enumerate(self.ids)}  # later rows supersede

    @classmethod
    def open(cls, path: str | Path) -> NewsStore:
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path}: not a news store (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"{path}: store version {meta.get('version')} (this rmbert reads {STORE_VERSION}); re-encode"
            )
        ids: list[str] = []
        info: list[dict] = []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in meta["arrays"]}
        for seg in meta["segments"]:
            d = path / seg
            seg_ids = (
                (d / "ids.txt").read_text(encoding="utf-8").split("\n")
                if (d / "ids.txt").stat().st_size
                else []
            )
            ids += seg_ids
            with open(d / "news.jsonl", encoding="utf-8") as f:
                info += [json.loads(line) for line in f]
            for name in parts:
                parts[name].append(np.load(d / f"{name}.npy", mmap_mode="r"))
        arrays = {n: (p[0] if len(p) == 1 else np.concatenate(p)) for n, p in parts.items()}
        return cls(path, meta, ids, arrays, info)

    def __len__(self) -> int:
        return len(self.ids)

    def pooled(self) -> np.ndarray:
        """[rows, D] mean of each news's title-token vectors: the stored `pool` array, or (a store
        written before it existed) computed once from the tokens and kept in memory."""
        if "pool" not in self.arrays:
            tok, mask = self.arrays["tokens"], self.arrays["mask"]
            out = np.zeros((len(tok), tok.shape[2]), np.float16)
            for s in range(0, len(tok), 4096):
                t = torch.from_numpy(np.asarray(tok[s : s + 4096], dtype=np.float32))
                out[s : s + 4096] = mean_pool(t, torch.from_numpy(np.array(mask[s : s + 4096]))).numpy()
            self.arrays["pool"] = out
        return self.arrays["pool"]

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
        encoder: BertNewsEncoder,
        tokenizer,
        info: list[dict] | None = None,
        progress: bool = False,
    ) -> NewsStore:
        """Encode and append news durably; returns the reopened store (self is unchanged)."""
        if self.meta.get("encoder") and self.meta["encoder"] != encoder_fingerprint(encoder, tokenizer):
            raise ValueError(f"{self.path}: built with another encoder; appending would mix vector spaces")
        segs = self.meta["segments"]
        name = f"seg-{len(segs):05d}"
        for stale in self.path.glob("seg-*"):  # segments a crashed append left behind
            if stale.name not in segs:
                shutil.rmtree(stale, ignore_errors=True)
        _write_segment(
            self.path / name,
            ids,
            titles,
            info or [{} for _ in ids],
            encoder,
            tokenizer,
            self.meta["kind"],
            self.meta.get("k", 0),
            False,
            64,
            progress,
        )
        _crash_point("before_meta")
        _write_json_atomic(self.path / "meta.json", {**self.meta, "segments": [*segs, name]})
        return NewsStore.open(self.path)


def build_store(
    out: str | Path,
    ids: list[str],
    titles: list[str],
    encoder: BertNewsEncoder,
    tokenizer,
    kind: str = "vectors",
    k: int = 0,
    batch_size: int = 128,
    progress: bool = True,
    info: list[dict] | None = None,
    fingerprint: str | None = None,
) -> NewsStore:
    """Encode `titles` into a new store at `out` (built beside it, then renamed into place)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_segment(
        tmp / "seg-00000",
        ids,
        titles,
        info or [{} for _ in ids],
        encoder,
        tokenizer,
        kind,
        k,
        True,
        batch_size,
        progress,
    )
    meta = {
        "version": STORE_VERSION,
        "kind": kind,
        "k": k,
        "max_title_len": encoder.max_title_len,
        "dim": encoder.dim,
        "arrays": ["input_ids", "attn", *KIND_ARRAYS[kind]],
        "segments": ["seg-00000"],
        "encoder": fingerprint or encoder_fingerprint(encoder, tokenizer),
    }
    _write_json_atomic(tmp / "meta.json", meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return NewsStore.open(out)


def cached_store(
    ids: list[str],
    titles: list[str],
    encoder: BertNewsEncoder,
    tokenizer,
    kind: str = "vectors",
    k: int = 0,
    root: Path | None = None,
    progress: bool = True,
    fingerprint: str | None = None,
) -> NewsStore:
    """The store for these news under this encoder, built once and reused by later runs."""
    fp = fingerprint or encoder_fingerprint(encoder, tokenizer)
    key = store_key(fp, kind, k, encoder.max_title_len, ids, titles)
    path = (root or cache_dir() / "stores") / key
    if (path / "meta.json").is_file():
        return NewsStore.open(path)
    return build_store(path, ids, titles, encoder, tokenizer, kind, k, progress=progress, fingerprint=fp)
