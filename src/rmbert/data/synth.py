"""Planted MIND-format data with a known click model, for demos, tests and scale checks.

Each news belongs to a story (a pair of signature words) inside a subcategory inside a
category; its title mixes real English topic words with filler words. Each user follows
2-4 subcategories; the history samples those (with some noise). The probability that a user
clicks a candidate depends on its best match with a *specific* history item:

    logit = base + weight * max_j sim(candidate, history_j) + category_bias[category]
    sim = 1 (same story) | 0.55 (same subcategory) | 0.2 (same category) | 0

so an average user profile is not enough to rank well. `oracle.json` holds the metrics of
ranking by the true click probabilities. Deterministic per seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmbert.data.mind import format_time
from rmbert.data.words import FILLERS, TOPICS
from rmbert.metrics import mind_metrics

DAY = 86400
START = 1573257600  # 11/9/2019 12:00:00 AM UTC


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    seed: int = 0
    stories_per_subcategory: int = 4
    train_days: int = 6
    base_logit: float = -3.0
    match_weight: float = 3.6
    category_bias_std: float = 0.4
    history_noise: float = 0.15  # share of history items from outside the user's interests
    interest_share: float = 0.4  # share of candidates drawn from the user's interests
    max_history: int = 40


def _subtopics() -> list[tuple[str, str, list[str]]]:
    return [(cat, sub, words) for cat, subs in TOPICS.items() for sub, words in subs.items()]


@dataclass
class _World:
    """The topic tree with its hidden parts: category biases and each subcategory's stories."""

    topics: list[tuple[str, str, list[str]]]  # (category, subcategory, topic words)
    sub_cat: np.ndarray  # [n_sub] category index of each subcategory
    cat_bias: np.ndarray  # [n_cat] category_bias[category]
    story_words: list[list[tuple[str, str]]]  # per subcategory, the signature word pair of each story


@dataclass
class _StoryNews:
    """The news table, sorted by publish time."""

    sub: np.ndarray  # [N] subcategory
    story: np.ndarray  # [N] story within the subcategory
    time: np.ndarray  # [N] publish time
    cat: np.ndarray  # [N] category
    titles: list[str]
    abstracts: list[str]
    ids: list[str]
    story_key: np.ndarray  # [N] story id unique across subcategories


# An impression: (impression id, user, time, candidates, labels, true click probabilities).
_Row = tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]


def _build_world(rng: np.random.Generator, cfg: SynthConfig) -> _World:
    """Category biases, then per subcategory its stories (a pair of signature words each)."""
    topics = _subtopics()
    cats = sorted({c for c, _, _ in topics})
    sub_cat = np.array([cats.index(c) for c, _, _ in topics])
    cat_bias = rng.normal(0.0, cfg.category_bias_std, len(cats))
    # A story is a pair of signature words of its subcategory.
    story_words = []
    for _, _, words in topics:
        picks = rng.permutation(len(words))[: 2 * cfg.stories_per_subcategory].reshape(-1, 2)
        story_words.append([(words[a], words[b]) for a, b in picks])
    return _World(topics, sub_cat, cat_bias, story_words)


def _story_title(
    rng: np.random.Generator, words: list[str], sig: tuple[str, str], sub: str
) -> tuple[str, str]:
    """A title (the story's signature words, 1-2 more topic words, 1-3 fillers, shuffled) and an abstract."""
    extra = [w for w in rng.permutation(words)[:3] if w not in sig][: int(rng.integers(1, 3))]
    fill = list(rng.choice(FILLERS, int(rng.integers(1, 4)), replace=False))
    toks = [*sig, *extra, *fill]
    toks = [toks[j] for j in rng.permutation(len(toks))]
    abstract = "" if rng.random() < 0.2 else f"More on {' and '.join(sig)} in {sub}."
    return " ".join(toks).capitalize(), abstract


def _build_news(rng: np.random.Generator, cfg: SynthConfig, world: _World) -> _StoryNews:
    """News: published from 3 days before the logs start to their end, with titles and abstracts."""
    n_sub = len(world.topics)
    n_news = 300 + cfg.users
    days = cfg.train_days + 1
    n_sub_of = rng.integers(0, n_sub, n_news)
    n_story = rng.integers(0, cfg.stories_per_subcategory, n_news)
    n_time = START + rng.integers(-3 * DAY, days * DAY, n_news)
    order = np.argsort(n_time, kind="stable")
    n_sub_of, n_story, n_time = n_sub_of[order], n_story[order], n_time[order]
    n_cat = world.sub_cat[n_sub_of]
    titles, abstracts = [], []
    for i in range(n_news):
        s = int(n_sub_of[i])
        sig = world.story_words[s][int(n_story[i])]
        title, abstract = _story_title(rng, world.topics[s][2], sig, world.topics[s][1])
        titles.append(title)
        abstracts.append(abstract)
    news_ids = [f"N{i + 1}" for i in range(n_news)]
    story_key = n_sub_of * cfg.stories_per_subcategory + n_story
    return _StoryNews(n_sub_of, n_story, n_time, n_cat, titles, abstracts, news_ids, story_key)


def _build_users(
    rng: np.random.Generator, cfg: SynthConfig, news: _StoryNews, n_sub: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Users: 2-4 subcategories of interest; history from news published before the logs."""
    old = np.flatnonzero(news.time < START)
    by_sub_old = [old[news.sub[old] == s] for s in range(n_sub)]
    interests, histories = [], []
    for _ in range(cfg.users):
        k = int(rng.integers(2, 5))
        subs = rng.choice(n_sub, k, replace=False)
        length = 0 if rng.random() < 0.03 else int(rng.integers(3, cfg.max_history + 1))
        hist = []
        for _ in range(length):
            if rng.random() < cfg.history_noise:
                hist.append(int(rng.choice(old)))
            else:
                pool = by_sub_old[int(rng.choice(subs))]
                hist.append(int(rng.choice(pool)) if len(pool) else int(rng.choice(old)))
        interests.append(subs)
        histories.append(np.array(sorted(set(hist), key=hist.index), dtype=np.int64))
    return interests, histories


def _click_prob(
    cfg: SynthConfig, world: _World, news: _StoryNews, h: np.ndarray, cands: np.ndarray
) -> np.ndarray:
    """The true click probabilities of `cands` for a user with history `h` (the module's click model)."""
    if len(h) == 0:
        best = np.zeros(len(cands))
    else:
        same_story = news.story_key[cands][:, None] == news.story_key[h][None, :]
        same_sub = news.sub[cands][:, None] == news.sub[h][None, :]
        same_cat = news.cat[cands][:, None] == news.cat[h][None, :]
        sim = np.where(same_story, 1.0, np.where(same_sub, 0.55, np.where(same_cat, 0.2, 0.0)))
        best = sim.max(axis=1)
    logit = cfg.base_logit + cfg.match_weight * best + world.cat_bias[news.cat[cands]]
    return 1.0 / (1.0 + np.exp(-logit))


def _impression(
    rng: np.random.Generator,
    cfg: SynthConfig,
    world: _World,
    news: _StoryNews,
    fresh_mine: np.ndarray,
    window: tuple[int, int],
    hist: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Candidates from news rows [lo, hi) (some of the user's interests), clicks; None if 3 draws get no click."""
    lo, hi = window
    for _attempt in range(3):
        c = int(rng.integers(5, 21))
        n_mine = min(len(fresh_mine), int(rng.binomial(c, cfg.interest_share)))
        mine = rng.choice(fresh_mine, n_mine, replace=False) if n_mine else np.array([], int)
        n_rest = min(c - n_mine, hi - lo - n_mine)
        draw = lo + rng.choice(hi - lo, min(n_rest + n_mine, hi - lo), replace=False)
        rest = draw[~np.isin(draw, mine)][:n_rest]
        cands = rng.permutation(np.concatenate([mine, rest]).astype(np.int64))
        p = _click_prob(cfg, world, news, hist, cands)
        y = (rng.random(len(cands)) < p).astype(np.int8)
        if y.any():  # MIND logs only impressions with a click
            return cands, y, p
    return None


def _simulate(
    rng: np.random.Generator,
    cfg: SynthConfig,
    world: _World,
    news: _StoryNews,
    interests: list[np.ndarray],
    histories: list[np.ndarray],
) -> dict[str, list[_Row]]:
    """Per user 1 + Poisson(2) training impressions and one on the dev day, of news from the 2 days before."""
    sub_rows = [np.flatnonzero(news.sub == s) for s in range(len(world.topics))]  # each sorted by time
    splits: dict[str, list[_Row]] = {"train": [], "dev": []}
    imp_id = 0
    for u in range(cfg.users):
        n_train = 1 + int(rng.poisson(2.0))
        when = [("train", START + int(rng.integers(0, cfg.train_days * DAY))) for _ in range(n_train)]
        when.append(("dev", START + cfg.train_days * DAY + int(rng.integers(0, DAY))))
        for split, t in when:
            lo, hi = np.searchsorted(news.time, [t - 2 * DAY, t])
            if hi - lo < 5:
                continue
            # news of the user's interests published in the window, without scanning the window
            fresh_mine = np.concatenate(
                [
                    r[np.searchsorted(r, lo) : np.searchsorted(r, hi)]
                    for r in (sub_rows[int(s)] for s in interests[u])
                ]
            )
            got = _impression(rng, cfg, world, news, fresh_mine, (lo, hi), histories[u])
            if got is not None:
                imp_id += 1
                splits[split].append((imp_id, u, t, *got))
    return splits


def _write_split(
    d: Path, world: _World, news: _StoryNews, histories: list[np.ndarray], rows: list[_Row]
) -> dict:
    """Write d/news.tsv (all news) and d/behaviors.tsv; returns the oracle metrics of `rows`."""
    d.mkdir(parents=True, exist_ok=True)
    news_ids = news.ids
    with open(d / "news.tsv", "w", encoding="utf-8") as f:
        for i in range(len(news_ids)):
            c, s, _ = world.topics[int(news.sub[i])]
            f.write(
                f"{news_ids[i]}\t{c}\t{s}\t{news.titles[i]}\t{news.abstracts[i]}\thttps://example.org/{news_ids[i]}\t[]\t[]\n"
            )
    with open(d / "behaviors.tsv", "w", encoding="utf-8") as f:
        for iid, u, t, cands, y, _ in rows:
            hist = " ".join(news_ids[j] for j in histories[u])
            imps = " ".join(f"{news_ids[j]}-{int(k)}" for j, k in zip(cands, y))
            f.write(f"{iid}\tU{u + 1}\t{format_time(t)}\t{hist}\t{imps}\n")
    sizes = np.array([len(r[3]) for r in rows])
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    labels = np.concatenate([r[4] for r in rows])
    probs = np.concatenate([r[5] for r in rows])
    return mind_metrics(labels, probs, ptr)


def synth(out: str | Path, cfg: SynthConfig = SynthConfig()) -> dict:
    """Write OUT/train, OUT/dev (MIND format) and OUT/oracle.json; returns the oracle metrics."""
    rng = np.random.default_rng(cfg.seed)
    out = Path(out)
    world = _build_world(rng, cfg)
    news = _build_news(rng, cfg, world)
    interests, histories = _build_users(rng, cfg, news, len(world.topics))
    splits = _simulate(rng, cfg, world, news, interests, histories)
    oracle = {}
    for split, rows in splits.items():
        rows.sort(key=lambda r: (r[2], r[0]))
        oracle[split] = _write_split(out / split, world, news, histories, rows)
    meta = {"config": cfg.__dict__, "oracle": oracle, "news": len(news.ids)}
    (out / "oracle.json").write_text(json.dumps(meta, indent=2))
    return meta
