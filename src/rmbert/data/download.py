"""Download MIND: known mirrors in order, HTTP Range resume, zip verification, unwrapping.

`download("mind-small", "data/")` leaves `data/mind-small/train` and `data/mind-small/dev`,
each a split folder that `rmbert data check` accepts.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

DATASETS: dict[str, dict[str, str]] = {
    "mind-small": {"train": "MINDsmall_train.zip", "dev": "MINDsmall_dev.zip"},
    "mind-large": {"train": "MINDlarge_train.zip", "dev": "MINDlarge_dev.zip", "test": "MINDlarge_test.zip"},
    "mind-demo": {"train": "MINDdemo_train.zip", "dev": "MINDdemo_dev.zip"},
}
# The mirrors have moved more than once; they are tried in this order after `--url`.
MIRRORS = [
    "https://mind201910small.blob.core.windows.net/release/",
    "https://recodatasets.z20.web.core.windows.net/newsrec/",
]
# sha256 of files whose digest is published; others are verified as zips only.
CHECKSUMS: dict[str, str] = {}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


class _Incomplete(Exception):
    pass


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Download url into `part`, resuming from its current size with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "rmbert-downloader"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete
            return
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        got = have
        with (
            open(part, mode) as f,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress
            ) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, ValueError) as e:  # connection reset or cut mid-body
                    raise _Incomplete(f"connection broke after {got} bytes ({e})") from None
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got < total:
            raise _Incomplete(f"got {got} of {total} bytes")


def _verify(zip_path: Path, name: str) -> None:
    expected = CHECKSUMS.get(name)
    if expected:
        h = hashlib.sha256()
        with open(zip_path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        if h.hexdigest() != expected:
            raise zipfile.BadZipFile(f"sha256 {h.hexdigest()} != expected {expected}")
    with zipfile.ZipFile(zip_path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} is corrupt")


def _unpack(zip_path: Path, dest: Path) -> None:
    """Extract, find the folder holding news.tsv + behaviors.tsv (zips may wrap it), move it to dest."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        found = [p.parent for p in Path(tmp).rglob("behaviors.tsv") if (p.parent / "news.tsv").is_file()]
        if not found:
            raise zipfile.BadZipFile("no folder with news.tsv and behaviors.tsv inside")
        src = min(found, key=lambda p: len(p.parts))
        staged = dest.with_name(dest.name + ".partial")
        if staged.exists():
            shutil.rmtree(staged)
        shutil.move(str(src), staged)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


def download(
    name: str,
    root: str | Path = "data",
    url: str | None = None,
    timeout: float = 60.0,
    attempts: int = 3,
    progress: bool = True,
) -> dict[str, Path]:
    """Download and unpack dataset `name`; returns {split: folder}. Finished splits are kept."""
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    base_dir = Path(root) / name
    cache = base_dir / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)
    bases = ([url if url.endswith("/") else url + "/"] if url else []) + MIRRORS
    done: dict[str, Path] = {}
    for split, fname in DATASETS[name].items():
        dest = base_dir / split
        if (dest / "news.tsv").is_file() and (dest / "behaviors.tsv").is_file():
            done[split] = dest
            continue
        part = cache / (fname + ".part")
        tried: list[str] = []
        for base in bases:
            src = base + fname
            try:
                for attempt in range(attempts):
                    try:
                        _fetch(src, part, timeout, progress)
                        break
                    except _Incomplete as e:
                        if attempt == attempts - 1:
                            raise DownloadError(f"incomplete after {attempts} attempts: {e}") from None
                _verify(part, fname)
                _unpack(part, dest)
                part.unlink()
                done[split] = dest
                break
            except zipfile.BadZipFile as e:
                tried.append(f"{src}: corrupt download ({e})")
                part.unlink(missing_ok=True)
            except urllib.error.HTTPError as e:
                tried.append(f"{src}: HTTP {e.code} {e.reason}")
            except (urllib.error.URLError, OSError, DownloadError) as e:
                reason = getattr(e, "reason", None) or e
                tried.append(f"{src}: {reason}")
        else:
            lines = "\n".join(f"  - {t}" for t in tried)
            raise DownloadError(f"could not download {name} {split} ({fname}); tried:\n{lines}")
    shutil.rmtree(cache, ignore_errors=True)
    return done
