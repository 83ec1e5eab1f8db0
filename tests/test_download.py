"""The downloader against a local HTTP server on 127.0.0.1 (plain, wrapped, cut off, corrupt)."""

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import news_line

from rmbert.data.download import DATASETS, DownloadError, download
from rmbert.data.mind import load_split

BEHAVIOR = "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N1-0\n"


def make_zip(wrap: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{wrap}news.tsv", news_line("N1", "a b") + "\n" + news_line("N2", "c d") + "\n")
        zf.writestr(f"{wrap}behaviors.tsv", BEHAVIOR)
        zf.writestr(f"{wrap}entity_embedding.vec", "x" * 50000)  # bulk, so a cut-off is mid-file
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_once: set[str] = set()
    requests: list[tuple[str, str | None]] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
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
        self.end_headers()
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
def no_real_mirrors(monkeypatch):
    monkeypatch.setattr("rmbert.data.download.MIRRORS", [])


def serve_demo(prefix: str, wrap: str = "") -> None:
    for fname in DATASETS["mind-demo"].values():
        Handler.files[f"{prefix}/{fname}"] = make_zip(wrap)


def test_plain_and_wrapped(server, tmp_path):
    serve_demo("/plain")
    serve_demo("/wrapped", wrap="MINDdemo_train/")
    for kind in ("plain", "wrapped"):
        out = download("mind-demo", tmp_path / kind, url=f"{server}/{kind}/", progress=False)
        assert set(out) == {"train", "dev"}
        split = load_split(out["train"])
        assert split.news.ids == ["N1", "N2"] and len(split.impressions) == 1
        assert not (tmp_path / kind / "mind-demo" / ".downloads").exists()


def test_cut_off_transfer_resumes_with_range(server, tmp_path):
    serve_demo("/m")
    Handler.cut_once.add("/m/MINDdemo_train.zip")
    out = download("mind-demo", tmp_path, url=f"{server}/m", progress=False)
    assert load_split(out["train"]).news.ids == ["N1", "N2"]
    train_reqs = [r for p, r in Handler.requests if p.endswith("MINDdemo_train.zip")]
    assert train_reqs[0] is None and train_reqs[1] is not None and train_reqs[1].startswith("bytes=")


def test_corrupt_then_next_mirror(server, tmp_path, monkeypatch):
    for fname in DATASETS["mind-demo"].values():
        Handler.files[f"/bad/{fname}"] = b"PK\x03\x04" + b"\x00" * 100
    serve_demo("/good")
    monkeypatch.setattr("rmbert.data.download.MIRRORS", [f"{server}/good/"])
    out = download("mind-demo", tmp_path, url=f"{server}/bad/", progress=False)
    assert load_split(out["dev"]).news.ids == ["N1", "N2"]


def test_all_fail_lists_what_was_tried(server, tmp_path, monkeypatch):
    for fname in DATASETS["mind-demo"].values():
        Handler.files[f"/bad/{fname}"] = b"garbage"
    monkeypatch.setattr("rmbert.data.download.MIRRORS", [f"{server}/missing/"])
    with pytest.raises(DownloadError) as e:
        download("mind-demo", tmp_path, url=f"{server}/bad/", progress=False)
    msg = str(e.value)
    assert "/bad/MINDdemo_train.zip: corrupt" in msg and "/missing/MINDdemo_train.zip: HTTP 404" in msg
    assert not (tmp_path / "mind-demo" / "train").exists()


def test_finished_splits_are_kept(server, tmp_path):
    serve_demo("/m")
    download("mind-demo", tmp_path, url=f"{server}/m", progress=False)
    n = len(Handler.requests)
    download("mind-demo", tmp_path, url=f"{server}/m", progress=False)
    assert len(Handler.requests) == n
