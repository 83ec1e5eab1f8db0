"""MIND-large end to end at full size on planted data: generate, train, encode, evaluate, predict, score.

Writes MIND-format splits of MIND-large's sizes (161,013 news; 2,232,748 train, 376,471 dev and
2,370,727 test impressions, 5 to 70 candidates and about 33 history items each, some histories
empty; the test split unlabeled, with a labeled twin as the score truth), then runs each step as
its own `rmbert` process (frozen training for a fixed number of steps, `encode` of all news,
`evaluate` on dev, `predict` and `score` on test) and records its wall time and peak RSS: the
child's own ru_maxrss from os.wait4, and the peaks of its anonymous and file-backed parts (the
memory-mapped store's pages are file-backed), sampled from /proc twice a second. Generation runs as
a child as well, and this parent imports neither numpy nor torch (so not benchmarks/_common.py): on
Linux a child's ru_maxrss starts at its parent's peak. Prints one JSON object (last line);
`under_8_gib` compares the largest peak of the rmbert steps with the 8 GiB target. This replaces
memory_plan.py's extrapolation with a run.
Usage: python benchmarks/mind_large.py [--scale 1.0] [--steps 300] [--out DIR] [--encoder NAME |
       --random-encoder D] [--model rmbert] [--preset default] [--seed 0] [--first-step train]
       [--last-step score] [--skip-existing] [--only-generate]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

LARGE = {"news": 161_013, "users": 1_000_000, "train": 2_232_748, "dev": 376_471, "test": 2_370_727}
SPLIT_NEWS = {"train": 101_527, "dev": 72_023, "test": 120_961}  # MIND-large news.tsv rows per split
SPLIT_DAYS = {"train": (9, 6), "dev": (15, 1), "test": (16, 7)}  # first day of November 2019, days
HISTORY_MEAN, EMPTY_HISTORY, CTR = 34.0, 0.03, 0.014  # CTR about 4% with the forced click
CANDIDATES = (5, 70)  # inclusive range, mean 37.5
CHUNK = 20_000  # impressions rendered at a time
TARGET_GIB = 8.0
MARKER = "done.json"
STEPS = ("train", "encode", "evaluate", "predict", "score")  # the rmbert steps, in order


# -- generation (a child process: --only-generate) ------------------------------------------------
def scaled_sizes(scale: float) -> dict[str, int]:
    return {k: max(1, round(v * scale)) for k, v in LARGE.items()}


def news_lines(n: int, seed: int) -> list[str]:
    """news.tsv rows N1..Nn: a category and subcategory of rmbert.data.words, a title of its topic
    words and fillers (real English tokens), a longer abstract, a URL, no entities."""
    import numpy as np

    from rmbert.data.words import FILLERS, TOPICS

    rng = np.random.default_rng([seed, 0])
    subs = [(c, s, words) for c, d in TOPICS.items() for s, words in d.items()]
    pick = rng.integers(0, len(subs), n)
    title_len, abs_len = rng.integers(6, 17, n), rng.integers(15, 36, n)
    topic_w, fill_w = rng.integers(0, 10, (n, 35)), rng.integers(0, len(FILLERS), (n, 35))
    use_topic = rng.random((n, 35)) < 0.6
    rows = zip(pick.tolist(), title_len.tolist(), abs_len.tolist(), topic_w.tolist(), fill_w.tolist())
    lines = []
    for i, (j, n_title, n_abs, tw, fw) in enumerate(rows):
        c, s, words = subs[j]
        text = [words[t % len(words)] if u else FILLERS[f] for t, f, u in zip(tw, fw, use_topic[i].tolist())]
        title, abstract = " ".join(text[:n_title]), " ".join(text[::-1][:n_abs])
        lines.append(
            f"N{i + 1}\t{c}\t{s}\t{title}\t{abstract}\thttps://assets.msn.com/labs/mind/AA{i + 1}.html\t[]\t[]\n"
        )
    return lines


def token_table(n_news: int) -> tuple[bytes, list[int]]:
    """Byte strings behaviors.tsv is made of, and their lengths: `N{i}` (entries 0..n-1),
    `N{i}-0` (n..2n-1), `N{i}-1` (2n..3n-1), then ' ', tab, two tabs, newline (3n..3n+3)."""
    ids = [f"N{i + 1}" for i in range(n_news)]
    words = [*ids, *(x + "-0" for x in ids), *(x + "-1" for x in ids), " ", "\t", "\t\t", "\n"]
    return "".join(words).encode(), [len(x) for x in words]


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions starts[i] + 0..lengths[i]-1 for every i, concatenated."""
    import numpy as np

    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))


def gather_bytes(blob: np.ndarray, off: np.ndarray, length: np.ndarray, pieces: np.ndarray) -> bytes:
    """The concatenation of table entries `pieces`, without a Python object per piece."""

    lens = length[pieces]
    return blob[ragged_positions(off[pieces], lens)].tobytes() if len(pieces) else b""


def impressions_chunk(rng: np.random.Generator, count: int, pool: np.ndarray) -> dict[str, np.ndarray]:
    """History and candidates (rows of the token table's news) and click labels of `count` impressions."""
    import numpy as np

    k = np.minimum(rng.geometric(1 / HISTORY_MEAN, count), 500)
    k[rng.random(count) < EMPTY_HISTORY] = 0
    m = rng.integers(CANDIDATES[0], CANDIDATES[1] + 1, count)
    labels = (rng.random(int(m.sum())) < CTR).astype(np.int64)
    ptr = np.cumsum(m) - m
    labels[ptr + (rng.random(count) * m).astype(np.int64)] = 1  # every impression has a click
    hist = pool[rng.integers(0, len(pool), int(k.sum()))]
    cand = pool[rng.integers(0, len(pool), int(m.sum()))]
    return {"k": k, "m": m, "hist": hist, "cand": cand, "labels": labels}


def headers(
    split: str, first: int, count: int, total: int, users: int, rng: np.random.Generator
) -> list[str]:
    """`id<TAB>user<TAB>time` of impressions first+1.., times rising through the split's days."""
    import numpy as np

    day0, days = SPLIT_DAYS[split]
    t = ((first + np.arange(count) + rng.random(count)) / total * days * 86400).astype(np.int64)
    day, hour, minute, sec = day0 + t // 86400, t // 3600 % 24, t // 60 % 60, t % 60
    user = rng.integers(1, users + 1, count)
    return [
        f"{first + i + 1}\tU{u}\t11/{d}/2019 {h % 12 or 12}:{mi:02d}:{s:02d} {'PM' if h >= 12 else 'AM'}"
        for i, (u, d, h, mi, s) in enumerate(
            zip(user.tolist(), day.tolist(), hour.tolist(), minute.tolist(), sec.tolist())
        )
    ]


def render(
    chunk: dict[str, np.ndarray], head: list[str], table: tuple[bytes, list[int]], labeled: bool
) -> bytes:
    """behaviors.tsv lines of a chunk: header, history ids, candidates (`N1-0` or bare `N1`)."""
    import numpy as np

    k, m, n = chunk["k"], chunk["m"], len(head)
    base, base_len = table
    n_news = (len(base_len) - 4) // 3
    sep = 3 * n_news
    hb = "".join(head).encode()
    blob = np.frombuffer(base + hb, dtype=np.uint8)
    length = np.array(base_len + [len(h) for h in head], dtype=np.int64)
    off = np.cumsum(length) - length
    start = np.concatenate([[0], np.cumsum(1 + k + m)])
    tok = np.empty(int(start[-1]), np.int64)
    gap = np.full(len(tok), sep, np.int64)  # ' '
    tok[start[:-1]] = len(base_len) + np.arange(n)
    gap[start[:-1]] = np.where(k > 0, sep + 1, sep + 2)  # an empty history: two tabs
    tok[ragged_positions(start[:-1] + 1, k)] = chunk["hist"]
    gap[(start[:-1] + k)[k > 0]] = sep + 1
    cand = chunk["cand"] + (n_news * (1 + chunk["labels"]) if labeled else 0)
    tok[ragged_positions(start[:-1] + 1 + k, m)] = cand
    gap[start[1:] - 1] = sep + 3
    pieces = np.empty(2 * len(tok), np.int64)
    pieces[0::2], pieces[1::2] = tok, gap
    return gather_bytes(blob, off, length, pieces)


def write_split(
    data: Path, split: str, sizes: dict[str, int], lines: list[str], seed: int, table: tuple[bytes, list[int]]
) -> dict[str, int | float]:
    """news.tsv (the split's share of the news) and behaviors.tsv (+ test-truth for test)."""
    import numpy as np

    code = ["train", "dev", "test"].index(split) + 1
    rng = np.random.default_rng([seed, code])
    n_split = max(1, round(SPLIT_NEWS[split] / LARGE["news"] * sizes["news"]))
    pool = np.sort(rng.choice(sizes["news"], n_split, replace=False))
    folders = [data / split] + ([data / "test-truth"] if split == "test" else [])
    for d in folders:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "news.tsv", "w") as f:
            f.writelines(lines[i] for i in pool.tolist())
    files = [open(d / "behaviors.tsv", "wb") for d in folders]  # closed below
    total, rows, hist = sizes[split], 0, 0
    try:
        for first in range(0, total, CHUNK):
            count = min(CHUNK, total - first)
            crng = np.random.default_rng([seed, code, first])
            chunk = impressions_chunk(crng, count, pool)
            head = headers(split, first, count, total, sizes["users"], crng)
            for f, labeled in zip(files, [split != "test", True]):
                f.write(render(chunk, head, table, labeled))
            rows, hist = rows + len(chunk["cand"]), hist + len(chunk["hist"])
    finally:
        for f in files:
            f.close()
    return {
        "news": n_split,
        "impressions": total,
        "candidate_rows": rows,
        "history_mean": round(hist / total, 1),
    }


def generate(data: Path, scale: float, seed: int) -> dict:
    sizes = scaled_sizes(scale)
    data.mkdir(parents=True, exist_ok=True)
    (data / MARKER).unlink(missing_ok=True)
    lines = news_lines(sizes["news"], seed)
    with open(data / "news.tsv", "w") as f:
        f.writelines(lines)
    table = token_table(sizes["news"])
    out = {"scale": scale, "seed": seed, "news": sizes["news"], "users": sizes["users"]}
    for split in ("train", "dev", "test"):
        out[split] = write_split(data, split, sizes, lines, seed, table)
    (data / MARKER).write_text(json.dumps(out) + "\n")
    return out


def existing(data: Path, scale: float, seed: int) -> dict | None:
    """The marker of data generated with this scale and seed, if complete."""
    try:
        meta = json.loads((data / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if (meta.get("scale"), meta.get("seed")) == (scale, seed) else None


def only_generate(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    meta = existing(a.out / "data", a.scale, a.seed) if a.skip_existing else None
    skipped = meta is not None
    meta = meta or generate(a.out / "data", a.scale, a.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    wall = round(time.perf_counter() - t0, 1)
    print(json.dumps({"sizes": meta, "skipped": skipped, "wall_s": wall, "peak_rss_gib": round(peak, 2)}))


# -- the workflow (this process: small, so the children's ru_maxrss are their own) --------------
def tail(path: Path, chars: int = 2000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def parse_output(path: Path) -> dict | None:
    """The JSON object a child printed (the rmbert CLI prints one, indented; this script one line)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    for start in (text.find("{"), text.rfind("\n{") + 1):
        try:
            return json.loads(text[start:])
        except ValueError:
            continue
    return None


def rss_split(pid: int) -> tuple[int, int]:
    """The process's resident anonymous and file-backed memory now, in KiB (0, 0 once gone).
    File-backed pages are the memory-mapped store's and the libraries': clean ones the kernel
    can drop under pressure, so the anonymous part is what a step cannot do without."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    kib = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith("Rss")}
    return kib.get("RssAnon", 0), kib.get("RssFile", 0) + kib.get("RssShmem", 0)


def run_child(name: str, cmd: list[str], env: dict[str, str], logs: Path, every: float = 0.5) -> dict:
    """Run one step; its wall time, its own peak RSS (ru_maxrss), the peaks of its anonymous and
    file-backed parts (sampled every `every` s), and its JSON output (or the failure)."""
    logs.mkdir(parents=True, exist_ok=True)
    anon = file = 0
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        while True:
            a, f = rss_split(p.pid)
            anon, file = max(anon, a), max(file, f)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(every)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    rec: dict = {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    rec.update(peak_anon_gib=round(anon / 2**20, 2), peak_file_gib=round(file / 2**20, 2))
    if p.returncode != 0:
        rec.update(returncode=p.returncode, stderr_tail=tail(logs / f"{name}.err"))
    else:
        rec["output"] = parse_output(logs / f"{name}.out")
    return rec


def rmbert(*args: str) -> list[str]:
    return [sys.executable, "-m", "rmbert", "--quiet", *args]


def workflow(a: argparse.Namespace, data: Path) -> list[tuple[str, list[str]]]:
    """The rmbert steps, in order: train, encode, evaluate, predict, score."""
    run, out = a.out / "run", a.out
    encoder = ["--encoder", str(a.encoder)] if a.encoder else []
    model = ["--model", a.model, "--preset", a.preset]
    return [
        (
            "train",
            rmbert(
                "train",
                "--train",
                str(data / "train"),
                "--valid-fraction",
                "0.01",
                "--out",
                str(run),
                "--set",
                f"train.max_steps={a.steps}",
                *encoder,
                *model,
            ),
        ),
        ("encode", rmbert("encode", str(run), "--news", str(data / "news.tsv"), "--out", str(out / "store"))),
        ("evaluate", rmbert("evaluate", str(run), "--split", str(data / "dev"))),
        (
            "predict",
            rmbert("predict", str(run), "--split", str(data / "test"), "--out", str(out / "prediction.zip")),
        ),
        ("score", rmbert("score", str(out / "prediction.zip"), "--truth", str(data / "test-truth"))),
    ]


def extras(name: str, rec: dict, a: argparse.Namespace) -> None:
    """Fold the step's output into its record: samples/s, metrics, D."""
    out = rec.pop("output", None) or {}
    if name == "train":
        cfg = json.loads((a.out / "run" / "config.json").read_text())
        batch = cfg.get("train", {}).get("batch_size")
        rec.update(steps=out.get("steps"), batch_size=batch, train_time_s=out.get("time_s"))
        sps = out.get("train_samples_per_s")
        rec["samples_per_s"] = sps if sps is not None else round(a.steps * (batch or 0) / rec["wall_s"], 1)
    elif name == "encode":
        meta = json.loads((a.out / "store" / "meta.json").read_text())
        rec.update(news=out.get("news"), encoded=out.get("encoded"), D=meta.get("dim"))
        rec["store_gib"] = round(
            sum(f.stat().st_size for f in (a.out / "store").rglob("*") if f.is_file()) / 2**30, 2
        )
    elif name in ("evaluate", "score"):
        keys = ("auc", "mrr", "ndcg@5", "ndcg@10", "seconds")
        rec["metrics"] = {k: round(v, 4) for k, v in out.items() if k in keys and isinstance(v, float)}
    elif name == "predict":
        rec["impressions"] = out.get("impressions")
        rec["zip_mib"] = round((a.out / "prediction.zip").stat().st_size / 2**20, 1)


def random_encoder(a: argparse.Namespace) -> None:
    """--random-encoder D: a one-layer random BERT of width D over the generated titles' words,
    written to OUT/encoder-D (by a child process: it imports torch) and used as --encoder. The
    memory of every step depends on D, not on the encoder's depth or weights, so this measures
    bert-base's D = 768 offline."""
    path = a.out / f"encoder-{a.random_encoder}"
    code = (
        "import sys; from rmbert.data.words import FILLERS, TOPICS; "
        "from rmbert.encoders.bert import save_tiny_encoder; "
        "words = [w for d in TOPICS.values() for ws in d.values() for w in ws] + FILLERS; "
        "save_tiny_encoder(sys.argv[1], words, hidden=int(sys.argv[2]), layers=1)"
    )
    if not path.is_dir():  # --first-step after train reuses the encoder that run was trained with
        subprocess.run([sys.executable, "-c", code, str(path), str(a.random_encoder)], check=True)
    a.encoder = path


def fresh(out: Path) -> None:
    """Remove what an earlier run of the workflow left (the generated data stays)."""
    for name in ("run", "store", "cache", "logs", *(p.name for p in out.glob("encoder-*"))):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "prediction.zip").unlink(missing_ok=True)


def store_dim(out: Path) -> int | None:
    """D of the store an earlier invocation encoded (for --first-step after encode)."""
    meta = out / "store" / "meta.json"
    return json.loads(meta.read_text()).get("dim") if meta.is_file() else None


def child_env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RMBERT_CACHE=str(out / "cache"))
    return env


def main_workflow(a: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    if a.first_step == "train":
        fresh(a.out)
    elif not (a.out / "run" / "config.json").is_file():
        raise SystemExit(f"--first-step {a.first_step}: no run under {a.out} (run from train first)")
    env, logs, data = child_env(a.out), a.out / "logs", a.out / "data"
    if a.random_encoder:
        random_encoder(a)
    gen_cmd = [sys.executable, str(Path(__file__).resolve()), "--only-generate"]
    gen_cmd += ["--scale", repr(a.scale), "--seed", str(a.seed), "--out", str(a.out)]
    gen_cmd += ["--skip-existing"] if a.skip_existing else []
    steps: dict[str, dict] = {}
    failed = None
    first, last = STEPS.index(a.first_step), STEPS.index(a.last_step)
    chosen = workflow(a, data)[first : last + 1]  # workflow's names are STEPS
    for name, cmd in [("generate", gen_cmd), *chosen]:
        rec = steps[name] = run_child(name, cmd, env, logs)
        if "returncode" in rec:
            failed = name
            break
        if name == "generate":
            out = rec.pop("output") or {}
            rec.update(skipped=out.get("skipped"))
        else:
            extras(name, rec, a)
    sizes = json.loads((data / MARKER).read_text()) if (data / MARKER).is_file() else None
    peaks = {k: v["peak_rss_gib"] for k, v in steps.items() if k != "generate"}
    top = max(peaks, key=peaks.__getitem__) if peaks else None
    return {
        "scale": a.scale,
        "train_steps": a.steps,
        "encoder": f"random, 1 layer, D = {a.random_encoder}" if a.random_encoder else a.encoder or "default",
        "model": a.model,
        "preset": a.preset,
        "sizes": sizes,
        "steps": steps,
        "failed": failed,
        "first_step": a.first_step,
        "last_step": a.last_step,
        "D": steps.get("encode", {}).get("D") or store_dim(a.out),
        "max_peak_rss_gib": peaks.get(top) if top else None,
        "max_peak_rss_step": top,
        "under_8_gib": bool(top) and peaks[top] < TARGET_GIB and failed is None,
        "parent_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every size (news, users, impressions)"
    )
    ap.add_argument("--steps", type=int, default=300, help="frozen training steps")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmbert-bench" / "mind-large")
    ap.add_argument(
        "--encoder", default=None, help="passed to `rmbert train --encoder` (default: its default)"
    )
    ap.add_argument(
        "--random-encoder",
        type=int,
        default=0,
        metavar="D",
        help="a one-layer random BERT of width D instead (768: bert-base's width, offline)",
    )
    ap.add_argument("--model", default="rmbert", help="passed to `rmbert train --model` (rmbert, nrms, ...)")
    ap.add_argument("--preset", default="default", choices=("default", "paper"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--first-step",
        default="train",
        choices=STEPS,
        help="start at this step, reusing the run folder, store and cache that an earlier invocation "
        "left under --out (with --skip-existing; e.g. to measure evaluate again after a change)",
    )
    ap.add_argument(
        "--last-step",
        default="score",
        choices=STEPS,
        help="stop after this step (evaluate: skip predict and score, e.g. for a slow model)",
    )
    ap.add_argument(
        "--skip-existing", action="store_true", help="reuse data generated with this scale and seed"
    )
    ap.add_argument("--only-generate", action="store_true", help="write the data and stop")
    a = ap.parse_args()
    a.out = a.out.resolve()
    if STEPS.index(a.first_step) > STEPS.index(a.last_step):
        ap.error(f"--first-step {a.first_step} comes after --last-step {a.last_step}")
    a.skip_existing = a.skip_existing or a.first_step != "train"  # the run was trained on that data
    if a.only_generate:
        only_generate(a)
    else:
        print(json.dumps(main_workflow(a)))


if __name__ == "__main__":
    main()
