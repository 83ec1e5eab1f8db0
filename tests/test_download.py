"""The downloader against local servers on 127.0.0.1: plain HTTP (wrapped, cut off, corrupt) and one
that behaves like the Hugging Face Hub (a redirect to storage, its headers, Range across the redirect)."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import news_line

from rmbert.data.download import DATASETS, DownloadError, download
from rmbert.data.mind import load_split

BEHAVIOR = "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N1-0\n"


def make_zip(wrap: str = "", behaviors: str = BEHAVIOR, news: list[str] | None = None) -> bytes:
    buf = io.BytesIO()
    news = news or [news_line("N1", "a b"), news_line("N2", "c d")]
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{wrap}news.tsv", "".join(n + "\n" for n in news))
        zf.writestr(f"{wrap}behaviors.tsv", behaviors)
        zf.writestr(f"{wrap}entity_embedding.vec", "x" * 50000)  # bulk, so a cut-off is mid-file
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_once: set[str] = set()
    requests: list[tuple[str, str | None]] = []

    def log_message(self, *a):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        hub = "/datasets/yjw1029/MIND/resolve/main/"
        if self.path.startswith(hub):  # the Hub: a redirect to storage, with the metadata headers
            data = self.files.get("/storage/" + self.path[len(hub) :])
            if data is None:
                self.send_error(404)
                return
            self.send_response(302)  # to "another host" (the Hub's CDN): the same server by its IP
            port = self.server.server_address[1]
            self.send_header("Location", f"http://127.0.0.1:{port}/storage/" + self.path[len(hub) :])
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if head:
            return
        if self.path in self.cut_once:  # send half, then drop the connection
            self.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.files, Handler.cut_once, Handler.requests = {}, set(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_real_sources(monkeypatch, tmp_path):
    """No test reaches the real Hub or the dead hosts: the Hub is offline unless a test points
    HF_ENDPOINT at its local server."""
    import huggingface_hub.constants

    monkeypatch.setattr("rmbert.data.download.DEAD_MIRRORS", [])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def serve_small(prefix: str, wrap: str = "") -> None:
    for fname in DATASETS["mind-small"].values():
        Handler.files[f"{prefix}/{fname}"] = make_zip(wrap)


def test_plain_and_wrapped(server, tmp_path):
    serve_small("/plain")
    serve_small("/wrapped", wrap="MINDsmall_train/")
    for kind in ("plain", "wrapped"):
        out = download("mind-small", tmp_path / kind, url=f"{server}/{kind}/", progress=False)
        assert set(out) == {"train", "dev"}
        split = load_split(out["train"])
        assert split.news.ids == ["N1", "N2"] and len(split.impressions) == 1
        assert not (tmp_path / kind / "mind-small" / ".downloads").exists()
        record = json.loads((tmp_path / kind / "mind-small" / "SOURCE.json").read_text())
        data = Handler.files[f"/{kind}/MINDsmall_train.zip"]
        assert record["train"] == {
            "file": "MINDsmall_train.zip",
            "source": f"{server}/{kind}/MINDsmall_train.zip",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def test_cut_off_transfer_resumes_with_range(server, tmp_path):
    serve_small("/m")
    Handler.cut_once.add("/m/MINDsmall_train.zip")
    out = download("mind-small", tmp_path, url=f"{server}/m", progress=False)
    assert load_split(out["train"]).news.ids == ["N1", "N2"]
    train_reqs = [r for p, r in Handler.requests if p.endswith("MINDsmall_train.zip")]
    assert train_reqs[0] is None and train_reqs[1] is not None and train_reqs[1].startswith("bytes=")


def test_corrupt_then_next_mirror(server, tmp_path, monkeypatch):
    for fname in DATASETS["mind-small"].values():
        Handler.files[f"/bad/{fname}"] = b"PK\x03\x04" + b"\x00" * 100
    serve_small("/good")
    monkeypatch.setattr("rmbert.data.download.DEAD_MIRRORS", [f"{server}/good/"])
    out = download("mind-small", tmp_path, url=f"{server}/bad/", progress=False)
    assert load_split(out["dev"]).news.ids == ["N1", "N2"]


def test_all_fail_lists_what_was_tried(server, tmp_path, monkeypatch):
    for fname in DATASETS["mind-small"].values():
        Handler.files[f"/bad/{fname}"] = b"garbage"
    monkeypatch.setattr("rmbert.data.download.DEAD_MIRRORS", [f"{server}/missing/"])
    with pytest.raises(DownloadError) as e:
        download("mind-small", tmp_path, url=f"{server}/bad/", progress=False)
    msg = str(e.value)
    assert "/bad/MINDsmall_train.zip: corrupt" in msg and "/missing/MINDsmall_train.zip: HTTP 404" in msg
    assert "hf://datasets/yjw1029/MIND/MINDsmall_train.zip: HF_HUB_OFFLINE" in msg
    assert not (tmp_path / "mind-small" / "train").exists()


def test_finished_splits_are_kept(server, tmp_path):
    serve_small("/m")
    download("mind-small", tmp_path, url=f"{server}/m", progress=False)
    n = len(Handler.requests)
    download("mind-small", tmp_path, url=f"{server}/m", progress=False)
    assert len(Handler.requests) == n


def hub(server, monkeypatch):
    """Point huggingface_hub at the local Hub-like server (by name: its storage redirect goes to the IP)."""
    monkeypatch.setenv("HF_ENDPOINT", server.replace("127.0.0.1", "localhost"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for fname in DATASETS["mind-small"].values():
        Handler.files[f"/storage/{fname}"] = make_zip("MINDsmall/")


def test_the_hub_is_the_default_source(server, tmp_path, monkeypatch):
    hub(server, monkeypatch)
    out = download("mind-small", tmp_path, progress=False)
    assert load_split(out["train"]).news.ids == ["N1", "N2"]
    paths = [p for p, _ in Handler.requests]
    assert "/datasets/yjw1029/MIND/resolve/main/MINDsmall_train.zip" in paths
    assert "/storage/MINDsmall_train.zip" in paths  # followed the redirect to storage
    record = json.loads((tmp_path / "mind-small" / "SOURCE.json").read_text())
    assert record["dev"]["source"] == "hf://datasets/yjw1029/MIND/MINDsmall_dev.zip"
    assert record["dev"]["sha256"] == hashlib.sha256(Handler.files["/storage/MINDsmall_dev.zip"]).hexdigest()
    n = len(Handler.requests)  # a second download of another root reads the Hub cache
    download("mind-small", tmp_path / "again", progress=False)
    assert not any(p.startswith("/storage/") for p, _ in Handler.requests[n:])


def test_the_hub_resumes_across_the_redirect(server, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub(server, monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # resumes from whole chunks
    Handler.cut_once.add("/storage/MINDsmall_train.zip")
    out = download("mind-small", tmp_path, progress=False)
    assert load_split(out["train"]).news.ids == ["N1", "N2"]
    gets = [r for p, r in Handler.requests if p == "/storage/MINDsmall_train.zip"]
    assert any(r is not None and r.startswith("bytes=") and r != "bytes=0-" for r in gets), gets


def test_mind_demo_is_built_from_mind_small(server, tmp_path, monkeypatch):
    import hashlib as h

    users = [f"U{i}" for i in range(60)]
    beh = "".join(
        f"{i + 1}\t{u}\t11/15/2019 8:55:22 AM\tN1\tN2-1 N{3 + i % 3}-0\n" for i, u in enumerate(users)
    )
    news = [news_line(f"N{i}", "a b") for i in range(1, 9)]
    for fname in DATASETS["mind-small"].values():
        Handler.files[f"/m/{fname}"] = make_zip(behaviors=beh, news=news)
    out = download("mind-demo", tmp_path, url=f"{server}/m", progress=False)
    kept = {u for u in users if int(h.sha256(u.encode()).hexdigest()[:8], 16) % 10 == 0}
    s = load_split(out["train"])
    assert set(s.impressions.users) == kept and 0 < len(kept) < 20
    assert set(s.news.ids) <= {"N1", "N2", "N3", "N4", "N5"} and "N8" not in s.news.ids
    assert (tmp_path / "mind-small" / "train" / "news.tsv").is_file()  # the source stays
    again = download("mind-demo", tmp_path / "b", url=f"{server}/m", progress=False)
    assert (again["dev"] / "behaviors.tsv").read_text() == (out["dev"] / "behaviors.tsv").read_text()


@pytest.mark.network
def test_every_listed_source_answers():
    """Opt-in (-m network): the Hub repository lists every MIND zip."""
    import urllib.request

    for fname in {f for d in DATASETS.values() for f in d.values()}:
        url = f"https://huggingface.co/datasets/yjw1029/MIND/resolve/main/{fname}"
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status in (200, 302), (fname, r.status)
