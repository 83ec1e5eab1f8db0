"""Download MIND: from `--url`, then the Hugging Face Hub (where MIND's official page points now),
with resumed transfers, zip verification, unwrapping, and a record of where the bytes came from.

`download("mind-small", "data/")` leaves `data/mind-small/train` and `data/mind-small/dev`, each a
split folder that `rmbert data check` accepts, and `data/mind-small/SOURCE.json` naming each
zip's source, size and sha256. `mind-demo` has had no source since its host went away: it is
built here, deterministically, from mind-small (about a tenth of its users).

The Hub source goes through `huggingface_hub`: its cache, resumed downloads, `HF_ENDPOINT` for
mirrors and `HF_HUB_OFFLINE` all apply. The two historical hosts are kept last, known dead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DATASETS: dict[str, dict[str, str]] = {
    "mind-small": {"train": "MINDsmall_train.zip", "dev": "MINDsmall_dev.zip"},
    "mind-large": {"train": "MINDlarge_train.zip", "dev": "MINDlarge_dev.zip", "test": "MINDlarge_test.zip"},
}
DERIVED = {"mind-demo": "mind-small"}  # built from another dataset after it is downloaded
HUB_REPO = "yjw1029/MIND"  # a dataset repository: resolve/main/MINDsmall_train.zip, ...
# The historical hosts: the Azure blob answers 409 PublicAccessNotPermitted since mid-2024 and the
# second stopped resolving in early 2026. Tried last, in case they come back.
DEAD_MIRRORS = [
    "https://mind201910small.blob.core.windows.net/release/",
    "https://recodatasets.z20.web.core.windows.net/newsrec/",
]
CHECKSUMS: dict[str, str] = {}  # sha256 of files whose digest is published; others are verified as zips
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


class _Incomplete(Exception):
    pass


@dataclass(frozen=True)
class Source:
    kind: str  # url | hub
    base: str  # a base URL, or the Hub repository

    def describe(self, fname: str) -> str:
        return f"{self.base}{fname}" if self.kind == "url" else f"hf://datasets/{self.base}/{fname}"


def sources(url: str | None) -> list[Source]:
    out = [Source("url", url if url.endswith("/") else url + "/")] if url else []
    return out + [Source("hub", HUB_REPO)] + [Source("url", m) for m in DEAD_MIRRORS]


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
        got = have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress)
        with open(part, "ab" if have else "wb") as f, bar:
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


def _from_url(src: str, part: Path, timeout: float, attempts: int, progress: bool) -> Path:
    for attempt in range(attempts):
        try:
            _fetch(src, part, timeout, progress)
            return part
        except _Incomplete as e:
            if attempt == attempts - 1:
                raise DownloadError(f"incomplete after {attempts} attempts: {e}") from None
    return part


def _from_hub(fname: str, timeout: float) -> Path:
    """The file from the Hub (or the HF_ENDPOINT mirror) through huggingface_hub's cache; the
    environment is read at call time (HF_ENDPOINT, HF_HUB_CACHE; HF_HUB_OFFLINE refuses)."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise DownloadError("HF_HUB_OFFLINE is set: the Hub is not asked")
    path = hf_hub_download(
        HUB_REPO,
        fname,
        repo_type="dataset",
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        etag_timeout=timeout,
    )
    return Path(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(zip_path: Path, name: str) -> str:
    digest = sha256(zip_path)
    expected = CHECKSUMS.get(name)
    if expected and digest != expected:
        raise zipfile.BadZipFile(f"sha256 {digest} != expected {expected}")
    with zipfile.ZipFile(zip_path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} is corrupt")
    return digest


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


def _one_split(fname: str, dest: Path, cache: Path, url, timeout, attempts, progress) -> dict:
    """Try every source in order for one zip; returns its SOURCE.json record."""
    tried: list[str] = []
    part = cache / (fname + ".part")
    for source in sources(url):
        where = source.describe(fname)
        try:
            if source.kind == "hub":
                path = _from_hub(fname, timeout)
            else:
                path = _from_url(where, part, timeout, attempts, progress)
            digest = _verify(path, fname)
            size = path.stat().st_size
            _unpack(path, dest)
            part.unlink(missing_ok=True)
            return {"file": fname, "source": where, "bytes": size, "sha256": digest}
        except zipfile.BadZipFile as e:
            tried.append(f"{where}: corrupt download ({e})")
            part.unlink(missing_ok=True)
        except urllib.error.HTTPError as e:
            tried.append(f"{where}: HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, OSError, DownloadError) as e:
            tried.append(f"{where}: {getattr(e, 'reason', None) or e}")
        except Exception as e:  # huggingface_hub's errors (offline mode, 404, connection)
            tried.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    dead = "; the last two hosts are known to be dead" if len(tried) > 2 else ""
    lines = "\n".join(f"  - {t}" for t in tried)
    raise DownloadError(f"could not download {fname}{dead}; tried:\n{lines}")


def download(
    name: str,
    root: str | Path = "data",
    url: str | None = None,
    timeout: float = 60.0,
    attempts: int = 3,
    progress: bool = True,
) -> dict[str, Path]:
    """Download and unpack dataset `name`; returns {split: folder}. Finished splits are kept."""
    if name in DERIVED:
        small = download(DERIVED[name], root, url, timeout, attempts, progress)
        return make_demo(small, Path(root) / name)
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; choose one of {', '.join([*DATASETS, *DERIVED])}")
    base_dir = Path(root) / name
    cache = base_dir / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)
    record_file = base_dir / "SOURCE.json"
    records = json.loads(record_file.read_text()) if record_file.is_file() else {}
    done: dict[str, Path] = {}
    for split, fname in DATASETS[name].items():
        dest = base_dir / split
        if not ((dest / "news.tsv").is_file() and (dest / "behaviors.tsv").is_file()):
            records[split] = _one_split(fname, dest, cache, url, timeout, attempts, progress)
            record_file.write_text(json.dumps(records, indent=2) + "\n")
        done[split] = dest
    shutil.rmtree(cache, ignore_errors=True)
    return done


def make_demo(small: dict[str, Path], out: Path, share: int = 10) -> dict[str, Path]:
    """A demo-sized MIND built from mind-small: the impressions of the users whose id hashes into
    1/`share` of the hash space (the same users in every split), and the news they reference."""
    from rmbert.data.mind import BEHAVIOR_COLUMNS, NEWS_COLUMNS, read_rows

    done: dict[str, Path] = {}
    for split, folder in small.items():
        dest = out / split
        dest.mkdir(parents=True, exist_ok=True)
        keep, used = [], set()
        for _, cols in read_rows(folder / "behaviors.tsv", BEHAVIOR_COLUMNS):
            if int(hashlib.sha256(cols[1].encode()).hexdigest()[:8], 16) % share == 0:
                keep.append("\t".join(cols))
                used.update(cols[3].split())
                used.update(c.rsplit("-", 1)[0] for c in cols[4].split())
        news = ["\t".join(c) for _, c in read_rows(folder / "news.tsv", NEWS_COLUMNS) if c[0] in used]
        (dest / "news.tsv").write_text("".join(x + "\n" for x in news), encoding="utf-8")
        (dest / "behaviors.tsv").write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        for extra in ("entity_embedding.vec", "relation_embedding.vec"):
            if (folder / extra).is_file():
                shutil.copyfile(folder / extra, dest / extra)
        done[split] = dest
    (out / "SOURCE.json").write_text(
        json.dumps(
            {"built_from": str(next(iter(small.values())).parent), "users": f"sha256(user) % {share} == 0"}
        )
        + "\n"
    )
    return done
