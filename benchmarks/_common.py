"""Helpers shared by the benchmark scripts (planted data, a quick run, peak memory, a server)."""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rmbert.config import RunConfig
from rmbert.data.synth import SynthConfig, synth
from rmbert.train import train


def planted(root: Path, users: int, seed: int = 0) -> Path:
    data = root / f"planted-{users}-{seed}"
    if not (data / "oracle.json").is_file():
        synth(data, SynthConfig(users=users, seed=seed))
    return data


def quick_run(data: Path, out: Path, steps: int = 20, **train_kw) -> Path:
    """A run folder trained for a few steps (speed does not depend on how well it is trained)."""
    if (out / "model.safetensors").is_file():
        return out
    cfg = RunConfig()
    cfg = cfg.override({"train.max_steps": steps} | {f"train.{k}": v for k, v in train_kw.items()})
    train(cfg, data / "train", out, data / "dev", progress=False)
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: bytes, path: str = "/rank") -> float:
    """One POST of a JSON body; its latency in seconds (raises on a status other than 200)."""
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def server(run_dir: Path, store_dir: Path, log: Path, args: list[str] = ()) -> Iterator[int]:
    """`rmbert serve run_dir --store store_dir` (and args) in a subprocess on 127.0.0.1; yields its
    port once /health answers 200, stops it on exit. Its stderr goes to the file `log`."""
    port = free_port()
    cmd = [sys.executable, "-m", "rmbert", "serve", str(run_dir), "--store", str(store_dir)]
    cmd += ["--host", HOST, "--port", str(port), "--quiet", *args]
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for _ in range(6000):
                if proc.poll() is not None:
                    break
                try:
                    with contextlib.closing(http.client.HTTPConnection(HOST, port, timeout=2)) as c:
                        c.request("GET", "/health")
                        r = c.getresponse()
                        body = r.read()
                except OSError:
                    time.sleep(0.1)
                    continue
                if r.status != 200:
                    raise RuntimeError(f"the server cannot rank: {body.decode()[:2000]}")
                break
            else:
                raise RuntimeError("the server did not answer in 10 minutes")
            if proc.poll() is not None:
                raise RuntimeError("the server did not start: " + log.read_text()[-2000:])
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
