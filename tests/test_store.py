"""The news store under concurrent writers, crashes, damage and full disks: nothing acknowledged
is lost or served under the wrong id, and a damaged store is an error naming the file."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import news_line
from fastapi.testclient import TestClient

from rmbert.cli import main
from rmbert.encoders.store import NewsStore, Segmented, StoreError
from rmbert.run import load_run
from rmbert.serve.app import Limits, create_app


@pytest.fixture
def store_dir(served, tmp_path):
    d = tmp_path / "store"
    shutil.copytree(served / "store", d)
    return d


@pytest.fixture(scope="module")
def run(served):
    return load_run(served / "run")


def extra_news(tmp_path, ids, title="snow storm blizzard"):
    f = tmp_path / f"extra-{ids[0]}.tsv"
    f.write_text("".join(news_line(i, title, "weather") + "\n" for i in ids))
    return f


def encode(served, news_tsv, store_dir):
    args = ["--quiet", "encode", str(served / "run"), "--news", str(news_tsv), "--out", str(store_dir)]
    assert main(args) == 0


def test_a_stale_writer_never_deletes_another_writers_news(served, store_dir, run, tmp_path):
    stale = NewsStore.open(store_dir)  # a server's view, opened before the other writer
    encode(served, extra_news(tmp_path, ["E1", "E2"]), store_dir)  # the other writer
    after = stale.append(["P1"], ["storm"], run.encoding)
    assert {"E1", "E2", "P1"} <= set(after.index)
    again = NewsStore.open(store_dir)
    assert {"E1", "E2", "P1"} <= set(again.index) and len(again.segments) == 3
    assert again.verify()["ok"]


def test_encode_into_a_live_store_then_post_then_restart(served, store_dir, tmp_path, planted):
    with TestClient(create_app(served / "run", store_dir, limits=Limits(store_poll_s=0))) as c:
        encode(served, extra_news(tmp_path, ["E1", "E2"]), store_dir)
        r = c.post("/news", json=[{"id": "P1", "title": "storm snow", "category": "weather"}])
        assert r.status_code == 200
        body = {"history": ["E1"], "candidates": ["E2", "P1"]}
        assert c.post("/rank", json=body).status_code == 200  # the server took in E1, E2 with its append
    with TestClient(create_app(served / "run", store_dir)) as c:  # a restart
        r = c.post("/rank", json=body)
        assert r.status_code == 200 and {x["id"] for x in r.json()["ranked"]} == {"E2", "P1"}


def test_the_server_takes_in_other_writers_segments(served, store_dir, tmp_path):
    with TestClient(create_app(served / "run", store_dir, limits=Limits(store_poll_s=0.05))) as c:
        before = c.get("/health").json()["news"]
        encode(served, extra_news(tmp_path, ["W1", "W2", "W3"]), store_dir)
        deadline = time.time() + 20
        while c.get("/health").json()["news"] < before + 3 and time.time() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json()["news"] == before + 3
        assert c.post("/rank", json={"history": ["W1"], "candidates": ["W2", "W3"]}).status_code == 200


def test_segments_are_viewed_not_copied(served, store_dir, run):
    one = NewsStore.open(store_dir)
    assert isinstance(one.arrays["cls"], np.memmap)  # one segment: the memmap itself
    two = one.append(["A1", "A2"], ["storm", "snow"], run.encoding)
    cls = two.arrays["cls"]
    assert isinstance(cls, Segmented) and all(isinstance(p, np.memmap) for p in cls.parts)
    whole = np.concatenate(cls.parts)
    rows = np.array([0, 5, len(one.ids), len(one.ids) + 1, len(one.ids) + 2, 3])
    assert np.array_equal(cls[rows], whole[rows])
    assert np.array_equal(two.arrays["tokens"][rows, :4], whole_tokens(two)[rows, :4])
    assert np.array_equal(cls[len(one.ids) :], whole[len(one.ids) :]) and len(cls) == len(whole)
    assert np.array_equal(cls[len(one.ids) + 1], whole[len(one.ids) + 1])
    assert two.rows(["A2"]).tolist() == [len(one.ids) + 2]


def resident_file_kib() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssFile")).split()[1])


def test_release_drops_the_pages_and_keeps_the_data(served, store_dir, run):
    """`release` takes a read-only store's token pages out of the process's resident memory
    (Linux: RssFile falls by them) on every segment, and the rows read back the same."""
    two = NewsStore.open(store_dir).append(["A1", "A2"], ["storm", "snow"], run.encoding)
    rows = np.arange(len(two.ids) + 1)
    before = whole_tokens(two).copy()
    assert np.array_equal(two.arrays["tokens"][rows], before)  # every page mapped in
    two.release()
    two.release(("no such array",))  # names the store lacks are skipped
    assert np.array_equal(two.arrays["tokens"][rows], before)
    if sys.platform.startswith("linux"):
        one = NewsStore.open(store_dir)
        big = np.lib.format.open_memmap(store_dir.parent / "big.npy", "w+", np.float16, (4096, 256))
        big[:] = 1
        big.flush()
        one.arrays["tokens"] = np.load(store_dir.parent / "big.npy", mmap_mode="r")  # 2 MiB of pages
        assert float(one.arrays["tokens"].sum(dtype=np.float32)) == 4096 * 256
        mapped = resident_file_kib()
        one.release()
        assert resident_file_kib() < mapped - 1024
        assert float(one.arrays["tokens"].sum(dtype=np.float32)) == 4096 * 256


def whole_tokens(store):
    return np.concatenate(store.arrays["tokens"].parts)


CRASH = """
import sys
from rmbert.encoders.store import NewsStore
from rmbert.run import load_run
run = load_run(sys.argv[1])
NewsStore.open(sys.argv[2]).append(["CRASHED"], ["storm"], run.encoding)
"""


def test_crash_clean_up_removes_only_the_dead_writers_segment(served, store_dir, run):
    before = NewsStore.open(store_dir)
    env = dict(os.environ, RMBERT_CRASH_AT="before_meta")
    p = subprocess.run(
        [sys.executable, "-c", CRASH, str(served / "run"), str(store_dir)], env=env, capture_output=True
    )
    assert p.returncode == 86, p.stderr.decode()[-2000:]
    assert (store_dir / "seg-00001").is_dir() and (store_dir / ".pending").is_file()
    unknown = store_dir / "seg-00009"  # a folder no writer of ours made: never touched
    unknown.mkdir()
    (unknown / "keep.txt").write_text("not ours")
    after = NewsStore.open(store_dir)
    assert after.ids == before.ids and "CRASHED" not in after.index
    assert np.array_equal(after.arrays["cls"], before.arrays["cls"])
    again = after.append(["N_NEW"], ["snow"], run.encoding)
    assert (
        "N_NEW" in again.index
        and json.loads((store_dir / "meta.json").read_text())["segments"][-1] == "seg-00001"
    )
    assert (unknown / "keep.txt").read_text() == "not ours" and not (store_dir / ".pending").exists()
    assert NewsStore.open(store_dir).verify()["unlisted_folders"] == ["seg-00009"]


def test_a_full_disk_leaves_the_store_as_it_was(served, store_dir, run, monkeypatch):
    import errno

    import rmbert.encoders.store as store_mod

    real = store_mod._open
    calls = []

    def failing(folder, name, shape, dtype):
        calls.append(name)
        if name == "tokens":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, name, shape, dtype)

    before = NewsStore.open(store_dir)
    meta = (store_dir / "meta.json").read_text()
    monkeypatch.setattr(store_mod, "_open", failing)
    with pytest.raises(OSError):
        before.append(["F1"], ["storm"], run.encoding)
    assert "tokens" in calls
    assert (store_dir / "meta.json").read_text() == meta
    assert sorted(p.name for p in store_dir.glob("seg-*")) == ["seg-00000"]
    monkeypatch.setattr(store_mod, "_open", real)
    assert "F1" in before.append(["F1"], ["storm"], run.encoding).index


def test_post_news_on_a_full_disk_is_a_json_507(served, store_dir, monkeypatch):
    import errno

    import rmbert.encoders.store as store_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with TestClient(create_app(served / "run", store_dir)) as c:
        before = c.get("/health").json()["news"]
        monkeypatch.setattr(store_mod, "_open", full)
        r = c.post("/news", json=[{"id": "F1", "title": "storm"}])
        assert r.status_code == 507 and "nothing was added" in r.json()["detail"]
        assert c.get("/health").json()["news"] == before
    assert "F1" not in NewsStore.open(store_dir).index


def damage(store_dir, what):
    seg = store_dir / "seg-00000"
    if what == "ids":
        (seg / "ids.txt").write_text((seg / "ids.txt").read_text() + "\nEXTRA")
        return "ids.txt"
    if what == "jsonl":
        lines = (seg / "news.jsonl").read_text().splitlines(keepends=True)
        (seg / "news.jsonl").write_text("".join(lines[:-1]))
        return "news.jsonl"
    if what == "swap":  # same counts, ids in another order than their rows
        ids = (seg / "ids.txt").read_text().split("\n")
        ids[0], ids[1] = ids[1], ids[0]
        (seg / "ids.txt").write_text("\n".join(ids))
        return "news.jsonl"
    if what == "truncate":
        f = seg / "tokens.npy"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "tokens.npy"
    if what == "meta":
        (store_dir / "meta.json").write_text('{"version": 2, "kind"')
        return "meta.json"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["ids", "jsonl", "swap", "truncate", "meta"])
def test_a_damaged_store_is_an_error_naming_the_file(store_dir, what, capsys):
    name = damage(store_dir, what)
    with pytest.raises(StoreError, match=name):
        NewsStore.open(store_dir)
    assert main(["--quiet", "store", "verify", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


def test_verify_reads_everything(store_dir, capsys):
    assert main(["--quiet", "store", "verify", str(store_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["news"] > 0 and out["unlisted_folders"] == []
    # a NaN written inside an array (same size, so opening cannot see it) is found by verify
    arr = np.load(store_dir / "seg-00000" / "cls.npy", mmap_mode="r+")
    arr[3, 0] = np.nan
    arr.flush()
    assert main(["--quiet", "store", "verify", str(store_dir)]) == 2
    assert "cls.npy: non-finite" in capsys.readouterr().err


def test_one_writer_at_a_time(store_dir):
    from rmbert.encoders.store import writer_lock

    with writer_lock(store_dir):
        with pytest.raises(StoreError, match="another writer"):
            with writer_lock(store_dir, timeout=0.2):
                pass
    with writer_lock(store_dir, timeout=0.2):  # released
        pass
