"""The news store: every news encoded once, fp16 on disk, memory-mapped.

A store is a folder:
    meta.json    kind, encoder fingerprint, L, D, count (written last: its presence = complete)
    ids.txt      one news id per line; store row = line number (row 0 is the null news)
    arrays       kind "vectors": cls [N+1, D], tokens [N+1, L, D] (fp16), mask [N+1, L] (bool)
                 kind "lower":   hidden [N+1, S, D] (fp16) = states below the top k layers
                 both:           input_ids [N+1, S] (int32), attn [N+1, S] (bool)
Row 0 holds zeros and an all-false mask: padding and news missing from news.tsv map there.
Stores are keyed by encoder + tokenizer + L + the news themselves, so a rerun reuses one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rmbert.encoders.bert import BertNewsEncoder, tokenize_titles

STORE_VERSION = 1


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


def store_key(fingerprint: str, kind: str, k: int, max_title_len: int, ids: list[str], titles: list[str]) -> str:
    h = hashlib.sha256(f"{STORE_VERSION}|{fingerprint}|{kind}|{k}|{max_title_len}".encode())
    for nid, t in zip(ids, titles):
        h.update(f"{nid}\t{t}\n".encode())
    return h.hexdigest()[:24]


@dataclass
class NewsStore:
    path: Path
    meta: dict
    ids: list[str]
    arrays: dict[str, np.ndarray]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {nid: i + 1 for i, nid in enumerate(self.ids)}

    @classmethod
    def open(cls, path: str | Path) -> NewsStore:
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path}: not a news store (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        ids = (path / "ids.txt").read_text(encoding="utf-8").split("\n")[: meta["count"]]
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        return cls(path, meta, ids, arrays)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, news_ids: list[str]) -> np.ndarray:
        """Store rows of news ids (0 for ids the store lacks)."""
        return np.array([self.index.get(n, 0) for n in news_ids], dtype=np.int64)


@torch.no_grad()
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
    extra_meta: dict | None = None,
) -> NewsStore:
    """Encode `titles` into a store at `out` (written beside it, then renamed into place)."""
    out = Path(out)
    L = encoder.max_title_len
    S, D, N = L + 2, encoder.dim, len(ids) + 1
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    input_ids, attn = tokenize_titles(tokenizer, [""] + list(titles), L)  # [N, S]
    input_ids[0] = 0
    attn[0] = False
    if kind not in ("vectors", "lower", "tokens"):
        raise ValueError(f"unknown store kind {kind!r}")
    names = ["input_ids", "attn"] + {"vectors": ["cls", "tokens", "mask"], "lower": ["hidden"], "tokens": []}[kind]
    mm = {
        "input_ids": _open(tmp, "input_ids", (N, S), np.int32),
        "attn": _open(tmp, "attn", (N, S), np.bool_),
    }
    mm["input_ids"][:] = input_ids.numpy()
    mm["attn"][:] = attn.numpy()
    if kind == "vectors":
        mm["cls"] = _open(tmp, "cls", (N, D), np.float16)
        mm["tokens"] = _open(tmp, "tokens", (N, L, D), np.float16)
        mm["mask"] = _open(tmp, "mask", (N, L), np.bool_)
    elif kind == "lower":
        mm["hidden"] = _open(tmp, "hidden", (N, S, D), np.float16)
    was_training = encoder.training
    encoder.eval()
    # Encode in order of length so each batch pads only to its own longest title.
    order = np.argsort(attn[1:].sum(1).numpy(), kind="stable") + 1
    if kind == "tokens":  # token ids only: the encoder runs during training
        order = order[:0]
    for start in tqdm(range(0, len(order), batch_size), desc="encoding news", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        b_ids, b_attn = input_ids[rows], attn[rows]
        if kind == "vectors":
            r = encoder(b_ids, b_attn)
            mm["cls"][rows] = r.cls.numpy().astype(np.float16)
            mm["tokens"][rows] = r.tokens.numpy().astype(np.float16)
            mm["mask"][rows] = r.mask.numpy()
        else:
            s = int(b_attn.sum(1).max())
            h = encoder.lower(b_ids[:, :s], b_attn[:, :s], k)
            mm["hidden"][rows, :s] = h.numpy().astype(np.float16)
    encoder.train(was_training)
    for a in mm.values():
        a.flush()
    (tmp / "ids.txt").write_text("\n".join(ids), encoding="utf-8")
    meta = {
        "version": STORE_VERSION,
        "kind": kind,
        "k": k,
        "max_title_len": L,
        "dim": D,
        "count": len(ids),
        "arrays": names,
        **(extra_meta or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return NewsStore.open(out)


def _open(folder: Path, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


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
    return build_store(path, ids, titles, encoder, tokenizer, kind, k, progress=progress, extra_meta={"encoder": fp})
