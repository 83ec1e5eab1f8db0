"""`rmbert` keeps freed blocks for reuse (glibc's mallopt), asking in the order glibc needs."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest

from rmbert.cli import reuse_freed_memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


class FakeLibc:
    """A C library whose mallopt refuses map thresholds above `most` (glibc before 2.35: 32 MiB)."""

    def __init__(self, most: int | None) -> None:
        self.most, self.calls = most, []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return int(option != M_MMAP_THRESHOLD or self.most is None or value <= self.most)


@pytest.mark.parametrize(
    "most, calls",
    [
        (None, [(M_MMAP_THRESHOLD, 256 << 20), (M_TRIM_THRESHOLD, 256 << 20)]),
        (
            32 << 20,
            [(M_MMAP_THRESHOLD, 256 << 20), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20)],
        ),
        (1 << 20, [(M_MMAP_THRESHOLD, 256 << 20), (M_MMAP_THRESHOLD, 32 << 20)]),
    ],
)
def test_the_map_threshold_is_set_before_the_trim_threshold(monkeypatch, most, calls):
    """Setting the trim threshold first would stop glibc adjusting the map threshold, and a
    refused map threshold would then leave it at 128 KiB: worse than asking nothing."""
    libc = FakeLibc(most)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert reuse_freed_memory() is (most is None or most >= 32 << 20)
    assert libc.calls == calls


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert reuse_freed_memory() is False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibc_takes_the_settings():
    """In a process of its own: the settings would stay with this test session's process."""
    import subprocess

    code = "from rmbert.cli import reuse_freed_memory; raise SystemExit(0 if reuse_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_only_a_pass_over_a_split_keeps_freed_blocks():
    """evaluate and predict (one bounded pass over batches) set it; long, varied processes
    (training, reproduce, serve) do not: their heaps would only grow."""
    from rmbert.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["evaluate", "RUN", "--split", "S"]).reuse_memory is True
    assert parse(["predict", "RUN", "--split", "S", "--out", "P.zip"]).reuse_memory is True
    for argv in (
        ["train", "--train", "T", "--out", "O"],
        ["serve", "RUN", "--store", "S"],
        ["score", "P.zip", "--truth", "T"],
    ):
        assert getattr(parse(argv), "reuse_memory", False) is False, argv
