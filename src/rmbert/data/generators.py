"""Planted MIND-format benchmarks whose click signal is not a frozen-encoder title cosine.

`synth.py`'s "story" data is ranked almost as well by the max cosine between frozen sentence
vectors of the candidate's and the history's titles as by its true click model. The generators
here plant click mechanisms that such a no-training score cannot see, but that a model can learn
from what MIND files contain (news.tsv, behaviors.tsv, entity_embedding.vec) and the training
clicks:

- "entity": clicks follow named entities (the same entity, or one related to it in a hidden
  graph) of specific history items, and random per-user category affinities.
- "drift": multi-interest users whose interests drift (recent history counts more), a hidden
  two-hop map between subcategories, and news popularity that rises and decays with age.
- "novelty": users want new stories on their topics; a story they already read is clicked less,
  unless the title brings an update; an explainer helps newcomers and bores followers.
- "story": the original generator of `rmbert.data.synth`, unchanged.

Every generator writes OUT/train and OUT/dev (dev is the day after the training days) and
OUT/oracle.json, whose "oracle" holds the MIND metrics of ranking by the true click
probabilities. Shared conventions: news are published over time (dev has fresh news unseen in
train); history = clicks before the logs (a few users have none); an impression shows 5-40 news
published in the 2 days before it and is logged only if it got a click (as in MIND), with up to
10 draws; candidates are shuffled within the impression. Deterministic per seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rmbert.data import words as W
from rmbert.data.mind import format_time
from rmbert.data.synth import DAY, START, SynthConfig, synth
from rmbert.metrics import mind_metrics

HOUR = 3600
_T0 = START - 60 * DAY  # every time handled here lies in [_T0, _T0 + _SPAN)
_SPAN = 120 * DAY
_TOPICS: list[tuple[str, str, list[str]]] = [
    (cat, sub, ws) for cat, subs in W.TOPICS.items() for sub, ws in subs.items()
]
_CATS: list[str] = sorted(W.TOPICS)
_SUB_CAT = np.array([_CATS.index(c) for c, _, _ in _TOPICS])
N_SUB = len(_TOPICS)
N_CAT = len(_CATS)
_CAT_SUBS = [np.flatnonzero(_SUB_CAT == c) for c in range(N_CAT)]
_FILLERS = [w for w in W.FILLERS if w not in {"update", "latest", "inside"}]


# --------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _Pool:
    """News grouped by an integer key (a news may be in several groups), each group sorted by time.

    `draw(rng, group, lo, hi)` returns, per query, a uniformly random member of `group` published
    in [lo, hi), or -1 where there is none; all queries in one vectorized call.
    """

    def __init__(self, news: np.ndarray, group: np.ndarray, times: np.ndarray) -> None:
        news, group = np.asarray(news, np.int64), np.asarray(group, np.int64)
        key = group * _SPAN + (times[news] - _T0)
        order = np.argsort(key, kind="stable")
        self.news, self.key = news[order], key[order]

    def draw(self, rng: np.random.Generator, group: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        group = np.asarray(group, np.int64)
        a = np.searchsorted(self.key, group * _SPAN + (np.asarray(lo) - _T0))
        b = np.searchsorted(self.key, group * _SPAN + (np.asarray(hi) - _T0))
        n = b - a
        pick = np.minimum(a + (rng.random(len(group)) * n).astype(np.int64), len(self.news) - 1)
        return np.where((n > 0) & (group >= 0), self.news[np.maximum(pick, 0)], -1)


def _pick_in_csr(rng: np.random.Generator, ptr: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per query, a random position in CSR group `owner` (ptr[o]:ptr[o+1]), or -1 if empty/owner < 0."""
    owner = np.asarray(owner, np.int64)
    ok = owner >= 0
    o = np.where(ok, owner, 0)
    n = ptr[o + 1] - ptr[o]
    pos = ptr[o] + (rng.random(len(o)) * n).astype(np.int64)
    return np.where(ok & (n > 0), pos, -1)


def _categorical(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per query, an index drawn from the distribution `probs[rows[i]]` (rows of probs sum to 1)."""
    cum = np.cumsum(probs, axis=1)
    r = rng.random(len(rows))[:, None]
    return np.minimum((cum[rows] < r).sum(axis=1), probs.shape[1] - 1)


def _csr(owner: np.ndarray, values: np.ndarray, n_owner: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(owner, kind="stable")
    ptr = np.zeros(n_owner + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=n_owner), out=ptr[1:])
    return ptr, values[order]


def _member_keys(owner: np.ndarray, item: np.ndarray, n_item: int) -> np.ndarray:
    """Sorted unique `owner * n_item + item` keys, for vectorized set membership."""
    return np.unique(np.asarray(owner, np.int64) * n_item + item)


def _isin_sorted(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(len(keys), bool)
    i = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return table[i] == keys


def _users_history(
    rng: np.random.Generator,
    users: int,
    min_len: int,
    max_len: int,
    empty_share: float,
) -> np.ndarray:
    """History lengths: `empty_share` of users have none, the rest uniform in [min_len, max_len]."""
    lengths = rng.integers(min_len, max_len + 1, users)
    lengths[rng.random(users) < empty_share] = 0
    return lengths


def _finish_history(
    users: int, hist_user: np.ndarray, hist_news: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Drop failed draws (-1) and repeats; order each user's history oldest first; CSR by user."""
    ok = hist_news >= 0
    u, n = hist_user[ok].astype(np.int64), hist_news[ok].astype(np.int64)
    pairs = np.unique(u * (len(times) + 1) + n)
    u, n = pairs // (len(times) + 1), pairs % (len(times) + 1)
    order = np.lexsort((n, times[n], u))
    u, n = u[order], n[order]
    ptr = np.zeros(users + 1, np.int64)
    np.cumsum(np.bincount(u, minlength=users), out=ptr[1:])
    return ptr, n


def _hist_keys(hist_ptr: np.ndarray, hist: np.ndarray, n_news: int) -> np.ndarray:
    return _member_keys(np.repeat(np.arange(len(hist_ptr) - 1), np.diff(hist_ptr)), hist, n_news)


@dataclass
class _Schedule:
    user: np.ndarray  # [S] the user of each planned impression
    time: np.ndarray  # [S] its time (seconds since the epoch)
    split: np.ndarray  # [S] 0 = train, 1 = dev


def _schedule(rng: np.random.Generator, users: int, train_days: int) -> _Schedule:
    """Per user 1 + Poisson(2) training impressions over the training days and one on the dev day."""
    n_train = 1 + rng.poisson(2.0, users)
    u_train = np.repeat(np.arange(users), n_train)
    t_train = START + rng.integers(0, train_days * DAY, len(u_train))
    t_dev = START + train_days * DAY + rng.integers(0, DAY, users)
    return _Schedule(
        np.concatenate([u_train, np.arange(users)]),
        np.concatenate([t_train, t_dev]),
        np.concatenate([np.zeros(len(u_train), np.int8), np.ones(users, np.int8)]),
    )


def _sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Candidates per impression: log-normal around 14, clipped to [5, 40]."""
    return np.clip(np.rint(np.exp(rng.normal(np.log(14.0), 0.55, n))), 5, 40).astype(np.int64)


@dataclass
class _Logs:
    user: np.ndarray  # [I]
    time: np.ndarray  # [I]
    split: np.ndarray  # [I]
    ptr: np.ndarray  # [I+1]
    cand: np.ndarray  # [R] news rows
    label: np.ndarray  # [R] int8
    prob: np.ndarray  # [R] true click probability


DrawFn = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]
ProbFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _repair(
    rng: np.random.Generator,
    imp: np.ndarray,
    ru: np.ndarray,
    rt: np.ndarray,
    cand: np.ndarray,
    n_news: int,
    uniform: _Pool,
    hist_keys: np.ndarray,
    window: int,
) -> np.ndarray:
    """Refill (in place, up to 8 rounds) -1 slots, repeats and history news of `cand`; returns the still bad."""
    bad = np.zeros(len(cand), bool)
    for _fix in range(8):
        key = imp * (n_news + 1) + np.maximum(cand, 0)
        order = np.argsort(key, kind="stable")
        dup = np.zeros(len(cand), bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        bad = (cand < 0) | dup | _isin_sorted(ru * n_news + cand, hist_keys)
        if not bad.any():
            break
        cand[bad] = uniform.draw(rng, np.zeros(int(bad.sum()), np.int64), rt[bad] - window, rt[bad])
    return bad


_Kept = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # impression, candidate, label, probability


def _attempt(
    rng: np.random.Generator,
    sched: _Schedule,
    pending: np.ndarray,
    n_news: int,
    uniform: _Pool,
    draw: DrawFn,
    prob: ProbFn,
    hist_keys: np.ndarray,
    window: int,
) -> tuple[np.ndarray, _Kept]:
    """One round for the `pending` impressions: draw, repair and click candidates; returns which got a
    click (and >= 5 candidates) and their rows."""
    sizes = _sizes(rng, len(pending))
    imp = np.repeat(np.arange(len(pending)), sizes)
    ru, rt = sched.user[pending][imp], sched.time[pending][imp]
    cand = np.asarray(draw(rng, ru, rt), np.int64)
    bad = _repair(rng, imp, ru, rt, cand, n_news, uniform, hist_keys, window)
    imp, ru, rt, cand = imp[~bad], ru[~bad], rt[~bad], cand[~bad]
    p = prob(ru, rt, cand)
    y = rng.random(len(p)) < p
    n_rows = np.bincount(imp, minlength=len(pending))
    ok = (np.bincount(imp, weights=y, minlength=len(pending)) > 0) & (n_rows >= 5)
    sel = ok[imp]
    return ok, (pending[imp[sel]], cand[sel], y[sel], p[sel])


def _order_logs(
    rng: np.random.Generator,
    sched: _Schedule,
    imp: np.ndarray,
    cand: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
) -> _Logs:
    """Impressions ordered by split then time; candidates shuffled within each impression."""
    rank = np.empty(len(sched.user), np.int64)
    rank[np.lexsort((np.arange(len(sched.user)), sched.time, sched.split))] = np.arange(len(sched.user))
    order = np.lexsort((rng.random(len(imp)), rank[imp]))
    imp, cand, y, p = imp[order], cand[order], y[order], p[order]
    first = np.flatnonzero(np.r_[True, imp[1:] != imp[:-1]])
    s = imp[first]
    ptr = np.append(first, len(imp)).astype(np.int64)
    return _Logs(sched.user[s], sched.time[s], sched.split[s], ptr, cand, y.astype(np.int8), p)


def _simulate(
    rng: np.random.Generator,
    sched: _Schedule,
    n_news: int,
    uniform: _Pool,
    draw: DrawFn,
    prob: ProbFn,
    hist_keys: np.ndarray,
    window: int = 2 * DAY,
    attempts: int = 10,
) -> _Logs:
    """Draw candidates (`draw(rng, row_user, row_time)` -> news or -1 per candidate slot), click
    them with `prob(row_user, row_time, row_news)`, keep impressions with a click (retrying up to
    `attempts` times); -1 slots, repeats within an impression and news in the user's history
    (`hist_keys`: sorted user * n_news + news) are refilled uniformly from the window."""
    pending = np.arange(len(sched.user))
    kept: list[_Kept] = []
    for _ in range(attempts):
        if len(pending) == 0:
            break
        ok, rows = _attempt(rng, sched, pending, n_news, uniform, draw, prob, hist_keys, window)
        kept.append(rows)
        pending = pending[~ok]
    imp, cand, y, p = (np.concatenate([k[j] for k in kept]) for j in range(4))
    return _order_logs(rng, sched, imp, cand, y, p)


@dataclass
class _News:
    time: np.ndarray  # [N] publish time, sorted
    sub: np.ndarray  # [N] subcategory index into _TOPICS
    title: list[str]
    abstract: list[str]
    title_entities: list[str] | None = None  # JSON per news
    abstract_entities: list[str] | None = None


def _write_news(path: Path, news: _News, news_ids: list[str], rows: np.ndarray) -> None:
    """news.tsv: the news `rows`, with their (JSON) title and abstract entities if any."""
    n = len(news.time)
    te = news.title_entities or ["[]"] * n
    ae = news.abstract_entities or ["[]"] * n
    with open(path, "w", encoding="utf-8") as f:
        for i in rows.tolist():
            c, s, _ = _TOPICS[int(news.sub[i])]
            f.write(
                f"{news_ids[i]}\t{c}\t{s}\t{news.title[i]}\t{news.abstract[i]}\t"
                f"https://example.org/{news_ids[i]}\t{te[i]}\t{ae[i]}\n"
            )


def _write_behaviors(path: Path, logs: _Logs, imps: np.ndarray, toks: list[str], hist_str: list[str]) -> None:
    """behaviors.tsv: the impressions `imps` (numbered from 1), `toks` = "N<id>-<label>" per candidate row."""
    with open(path, "w", encoding="utf-8") as f:
        for k, i in enumerate(imps.tolist(), 1):
            u = int(logs.user[i])
            line = " ".join(toks[logs.ptr[i] : logs.ptr[i + 1]])
            f.write(f"{k}\tU{u + 1}\t{format_time(int(logs.time[i]))}\t{hist_str[u]}\t{line}\n")


def _write_embedding(
    path: Path, embedding: tuple[list[str], np.ndarray, list[np.ndarray]], rows: np.ndarray
) -> None:
    """entity_embedding.vec: the vectors of the entities mentioned by the news `rows`."""
    qids, vecs, ents_of = embedding
    used = np.unique(np.concatenate([ents_of[i] for i in rows.tolist()] or [np.zeros(0, np.int64)]))
    with open(path, "w", encoding="utf-8") as f:
        for e in used.tolist():
            f.write(qids[e] + "\t" + "\t".join(f"{v:.6f}" for v in vecs[e]) + "\n")


def _split_metrics(logs: _Logs, imps: np.ndarray, hist_ptr: np.ndarray, n_rows: int) -> tuple[dict, dict]:
    """The oracle metrics and the summary stats of the impressions `imps` (contiguous in `logs`)."""
    a, b = logs.ptr[imps[0]] if len(imps) else 0, logs.ptr[imps[-1] + 1] if len(imps) else 0
    ptr = logs.ptr[imps[0] : imps[-1] + 2] - a if len(imps) else np.zeros(1, np.int64)
    oracle = mind_metrics(logs.label[a:b], logs.prob[a:b], ptr)
    stats = {
        "impressions": len(imps),
        "users": len(np.unique(logs.user[imps])),
        "candidate_rows": int(b - a),
        "ctr": round(float(logs.label[a:b].mean()), 4) if b > a else 0.0,
        "mean_candidates": round(float((b - a) / max(len(imps), 1)), 2),
        "empty_histories": int(sum(hist_ptr[u + 1] == hist_ptr[u] for u in logs.user[imps].tolist())),
        "news": n_rows,
    }
    return oracle, stats


def _write(
    out: Path,
    rng: np.random.Generator,
    name: str,
    cfg: EntityConfig | DriftConfig | NoveltyConfig,
    news: _News,
    hist_ptr: np.ndarray,
    hist: np.ndarray,
    logs: _Logs,
    train_days: int,
    embedding: tuple[list[str], np.ndarray, list[np.ndarray]] | None = None,
    truth: dict | None = None,
) -> dict:
    """Write both splits and oracle.json; `embedding` = (entity ids, vectors, entity rows per news);
    `truth`: hidden structure worth keeping for analysis (never read by a model)."""
    n = len(news.time)
    news_ids = [f"N{k}" for k in (10001 + rng.permutation(n)).tolist()]
    dev_start = START + train_days * DAY
    hist_str = [
        " ".join(news_ids[j] for j in hist[hist_ptr[u] : hist_ptr[u + 1]]) for u in range(len(hist_ptr) - 1)
    ]
    labs = ("-0", "-1")
    toks = [news_ids[c] + labs[k] for c, k in zip(logs.cand.tolist(), logs.label.tolist())]
    oracle: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for split_i, split in enumerate(("train", "dev")):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(news.time < dev_start) if split == "train" else np.arange(n)
        imps = np.flatnonzero(logs.split == split_i)
        _write_news(d / "news.tsv", news, news_ids, rows)
        _write_behaviors(d / "behaviors.tsv", logs, imps, toks, hist_str)
        if embedding is not None:
            _write_embedding(d / "entity_embedding.vec", embedding, rows)
        oracle[split], stats[split] = _split_metrics(logs, imps, hist_ptr, len(rows))
    meta = {"generator": name, "config": asdict(cfg), "oracle": oracle, "news": n, "stats": stats}
    if truth:
        meta["truth"] = truth
    (out / "oracle.json").write_text(json.dumps(meta, indent=2))
    return meta


def _news_times(rng: np.random.Generator, n: int, history_days: int, train_days: int) -> np.ndarray:
    """Publish times: uniform from `history_days` before the logs to the end of the dev day, sorted."""
    return np.sort(START + rng.integers(-history_days * DAY, (train_days + 1) * DAY, n))


def _topic_title(rng: np.random.Generator, sub: int, n_topic: int, extra: list[str] | None = None) -> str:
    words = _TOPICS[sub][2]
    toks = list(rng.choice(words, n_topic, replace=False))
    toks += list(rng.choice(_FILLERS, int(rng.integers(1, 3)), replace=False))
    toks += extra or []
    return " ".join(toks[j] for j in rng.permutation(len(toks)))


# --------------------------------------------------------------------------------------------
# "entity": entities and a hidden entity graph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntityConfig:
    users: int = 2000
    seed: int = 0
    train_days: int = 6
    history_days: int = 10
    news_base: int = 400  # news = news_base + news_per_user * users
    news_per_user: float = 1.0
    news_per_entity: float = 4.0  # entities = news / news_per_entity
    cluster_min: int = 3  # entities per hidden graph cluster
    cluster_max: int = 8
    cross_category: float = 0.2  # share of cluster members from another category
    same_cluster_mention: float = 0.6  # a news' 2nd/3rd entity is from its 1st entity's cluster
    topic_word_rate: float = 0.4  # titles that also carry one topic word of their subcategory
    base_logit: float = -4.9
    same_entity_weight: float = 0.6  # on top of related_entity_weight (the same entity is related)
    related_entity_weight: float = 1.6
    category_affinity_std: float = 1.1
    subcategory_bias_std: float = 0.3
    max_history: int = 30
    empty_history: float = 0.03
    history_follow: float = 0.5  # history items about followed clusters (rest: by category affinity)
    history_noise: float = 0.1
    cand_same_entity: float = 0.08  # candidate slots filled by the logging policy from ...
    cand_related: float = 0.15  # ... the entities / clusters of a history item, or
    cand_category: float = 0.25  # ... a category drawn from the user's affinity; rest uniform
    embedding_dim: int = 100
    embedding_cluster: float = 0.55  # weight of the cluster direction in an entity vector
    embedding_category: float = 0.3
    embedding_type: float = 0.3
    embedding_noise: float = 1.0


def _invented_names(rng: np.random.Generator, kind: str, cat: str, taken: set[str]) -> str:
    for attempt in range(60):
        head = str(rng.choice(W.NAME_HEADS))
        if kind == "P":
            name = f"{rng.choice(W.FIRST_NAMES)} {head}{rng.choice(W.SURNAME_TAILS)}"
        elif kind == "G":
            name = f"{rng.choice(W.PLACE_PREFIXES)}{head}{rng.choice(W.PLACE_TAILS)}"
        elif cat == "sports":
            name = f"{head}{rng.choice(W.PLACE_TAILS)} {rng.choice(W.TEAM_MASCOTS)}"
        else:
            name = f"{head}{rng.choice(W.BRAND_TAILS)} {rng.choice(W.ORG_SUFFIXES[cat])}"
        if attempt > 40:
            name += f" {rng.choice(W.NAME_HEADS)}"
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("could not invent a new entity name")


@dataclass
class _Entities:
    """The entity world: invented entities in hidden clusters, with categories, types and popularity."""

    n_cl: int  # hidden clusters
    cluster: np.ndarray  # [E] cluster K(e)
    cluster_cat: np.ndarray  # [n_cl] category of each cluster
    cat: np.ndarray  # [E] category (20% from another category than the cluster's)
    sub: np.ndarray  # [E] subcategory
    type: np.ndarray  # [E] 0 = P, 1 = O, 2 = G
    names: list[str]
    qids: list[str]
    pop: np.ndarray  # [E] Zipf-like popularity
    cl_ptr: np.ndarray  # CSR: the members of each cluster
    cl_members: np.ndarray
    cat_ptr: np.ndarray  # CSR: the entities of each category
    cat_ents: np.ndarray


@dataclass
class _EntityNews:
    """The news table of "entity" and its mentions (CSR by news)."""

    news: _News
    cat: np.ndarray  # [N] category (that of the first entity)
    ents_of: list[np.ndarray]  # entities mentioned by each news
    ment_ptr: np.ndarray  # [N+1]
    ment_ent: np.ndarray  # [M] entity of each mention
    ment_news: np.ndarray  # [M] news of each mention


@dataclass
class _EntityPools:
    """Pools for the history and the logging policy."""

    uniform: _Pool
    by_cat: _Pool
    by_ent: _Pool
    by_cluster: _Pool


@dataclass
class _EntityUsers:
    """Users: category affinities, the global subcategory bias, histories (CSR by user)."""

    aff: np.ndarray  # [U, N_CAT] a_u
    aff_p: np.ndarray  # [U, N_CAT] softmax(a_u)
    g_sub: np.ndarray  # [N_SUB] g
    hist_ptr: np.ndarray
    hist: np.ndarray


def _entity_world(rng: np.random.Generator, cfg: EntityConfig, n_ent: int) -> _Entities:
    """Entities and the hidden graph (clusters), names, ids and popularity."""
    sizes = rng.integers(cfg.cluster_min, cfg.cluster_max + 1, n_ent)
    n_cl = int(np.searchsorted(np.cumsum(sizes), n_ent)) + 1
    ent_cluster = np.repeat(np.arange(n_cl), sizes[:n_cl])[:n_ent]
    cluster_cat = rng.integers(0, N_CAT, n_cl)
    ent_cat = cluster_cat[ent_cluster]
    cross = rng.random(n_ent) < cfg.cross_category
    ent_cat[cross] = rng.integers(0, N_CAT, int(cross.sum()))
    ent_sub = np.array([_CAT_SUBS[c][rng.integers(0, 3)] for c in ent_cat.tolist()], np.int64)
    r = rng.random(n_ent)
    ent_type = np.where(r < 0.45, 0, np.where(r < 0.8, 1, 2))  # P, O, G
    type_code = ("P", "O", "G")
    taken: set[str] = set()
    names = [
        _invented_names(rng, type_code[t], _CATS[c], taken)
        for t, c in zip(ent_type.tolist(), ent_cat.tolist())
    ]
    qids = [f"Q{q}" for q in rng.choice(np.arange(1000, 10_000_000), n_ent, replace=False).tolist()]
    ent_pop = 1.0 / (rng.permutation(n_ent) + 5.0) ** 0.7
    cl_ptr, cl_members = _csr(ent_cluster, np.arange(n_ent), n_cl)
    cat_ptr, cat_ents = _csr(ent_cat, np.arange(n_ent), N_CAT)
    return _Entities(
        n_cl,
        ent_cluster,
        cluster_cat,
        ent_cat,
        ent_sub,
        ent_type,
        names,
        qids,
        ent_pop,
        cl_ptr,
        cl_members,
        cat_ptr,
        cat_ents,
    )


def _mentioned_entities(
    rng: np.random.Generator, cfg: EntityConfig, world: _Entities, e1: int, k: int, cat: int
) -> list[int]:
    """The entities of a news: `e1`, then up to k - 1 more from its cluster (or else its category)."""
    ents = [e1]
    for _ in range(k - 1):
        if rng.random() < cfg.same_cluster_mention:
            c = int(world.cluster[e1])
            pool = world.cl_members[world.cl_ptr[c] : world.cl_ptr[c + 1]]
        else:
            c = cat
            pool = world.cat_ents[world.cat_ptr[c] : world.cat_ptr[c + 1]]
        e = int(rng.choice(pool))
        if e not in ents:
            ents.append(e)
    return ents


def _entity_abstract(rng: np.random.Generator, world: _Entities, e1: int, sub: int) -> tuple[str, str]:
    """An abstract naming the first entity (or none, 35%) and its abstract_entities JSON."""
    if rng.random() < 0.35:
        return "", "[]"
    lead = f"The latest on {world.names[e1]}"
    mention = (e1, len("The latest on "), world.names[e1])
    return f"{lead} in {_TOPICS[sub][1]}.", _entity_json([mention], world.names, world.type, world.qids)


def _entity_news(rng: np.random.Generator, cfg: EntityConfig, world: _Entities, n_news: int) -> _EntityNews:
    """News: publish times, entities, category, subcategory, title and abstract (with entity JSON)."""
    times = _news_times(rng, n_news, cfg.history_days, cfg.train_days)
    first = rng.choice(len(world.cluster), n_news, p=world.pop / world.pop.sum())
    n_cat = world.cat[first]
    sub = np.where(
        rng.random(n_news) < 0.7,
        world.sub[first],
        np.array([_CAT_SUBS[c][rng.integers(0, 3)] for c in n_cat.tolist()]),
    )
    k_ent = rng.choice([1, 2, 3], n_news, p=[0.35, 0.45, 0.2])
    titles, abstracts, t_json, a_json, ents_of = [], [], [], [], []
    for i in range(n_news):
        e1 = int(first[i])
        ents = _mentioned_entities(rng, cfg, world, e1, int(k_ent[i]), int(n_cat[i]))
        title, mentions = _entity_title(rng, ents, world.names, world.type, int(sub[i]), cfg.topic_word_rate)
        titles.append(title)
        t_json.append(_entity_json(mentions, world.names, world.type, world.qids))
        abstract, a_ents = _entity_abstract(rng, world, e1, int(sub[i]))
        abstracts.append(abstract)
        a_json.append(a_ents)
        ents_of.append(np.array(ents, np.int64))
    news = _News(times, sub, titles, abstracts, t_json, a_json)
    ment_ptr = np.zeros(n_news + 1, np.int64)
    np.cumsum([len(e) for e in ents_of], out=ment_ptr[1:])
    ment_ent = np.concatenate(ents_of)
    ment_news = np.repeat(np.arange(n_news), np.diff(ment_ptr))
    return _EntityNews(news, n_cat, ents_of, ment_ptr, ment_ent, ment_news)


def _entity_pools(world: _Entities, en: _EntityNews) -> _EntityPools:
    """News pools: all, by category, by mentioned entity, by cluster of a mentioned entity."""
    times, n_news, n_cl = en.news.time, len(en.news.time), world.n_cl
    ment_cl = world.cluster[en.ment_ent]
    nc = np.unique(en.ment_news * n_cl + ment_cl)
    return _EntityPools(
        _Pool(np.arange(n_news), np.zeros(n_news, np.int64), times),
        _Pool(np.arange(n_news), en.cat, times),
        _Pool(en.ment_news, en.ment_ent, times),
        _Pool(nc // n_cl, nc % n_cl, times),
    )


def _entity_history(
    rng: np.random.Generator,
    cfg: EntityConfig,
    pools: _EntityPools,
    aff_p: np.ndarray,
    follows: np.ndarray,
    n_follow: np.ndarray,
    times: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Histories: news of followed clusters, of a category ~ softmax(a_u), or any (CSR by user)."""
    lengths = _users_history(rng, cfg.users, 3, cfg.max_history, cfg.empty_history)
    hu = np.repeat(np.arange(cfg.users), lengths)
    lo, hi = np.full(len(hu), START - cfg.history_days * DAY), np.full(len(hu), START)
    kind = rng.random(len(hu))
    fol = follows[hu, (rng.random(len(hu)) * n_follow[hu]).astype(np.int64)]
    hn = np.where(
        kind < cfg.history_follow,
        pools.by_cluster.draw(rng, fol, lo, hi),
        np.where(
            kind < 1.0 - cfg.history_noise,
            pools.by_cat.draw(rng, _categorical(rng, aff_p, hu), lo, hi),
            pools.uniform.draw(rng, np.zeros(len(hu), np.int64), lo, hi),
        ),
    )
    return _finish_history(cfg.users, hu, hn, times)


def _entity_users(
    rng: np.random.Generator, cfg: EntityConfig, world: _Entities, pools: _EntityPools, times: np.ndarray
) -> _EntityUsers:
    """Users: category affinities, 1-3 followed clusters, histories; and the subcategory bias g."""
    U = cfg.users
    aff = rng.normal(0.0, cfg.category_affinity_std, (U, N_CAT))
    aff_p = np.exp(aff) / np.exp(aff).sum(axis=1, keepdims=True)
    g_sub = rng.normal(0.0, cfg.subcategory_bias_std, N_SUB)
    n_follow = rng.integers(1, 4, U)
    fu = np.repeat(np.arange(U), 3)
    cl_by_cat_ptr, cl_by_cat = _csr(world.cluster_cat, np.arange(world.n_cl), N_CAT)
    pos = _pick_in_csr(rng, cl_by_cat_ptr, _categorical(rng, aff_p, fu))
    follows = np.where(pos >= 0, cl_by_cat[np.maximum(pos, 0)], -1).reshape(U, 3)
    hist_ptr, hist = _entity_history(rng, cfg, pools, aff_p, follows, n_follow, times)
    return _EntityUsers(aff, aff_p, g_sub, hist_ptr, hist)


@dataclass
class _EntityClicks:
    """The click model (`prob`) and the logging policy (`draw`) of "entity"."""

    cfg: EntityConfig
    world: _Entities
    en: _EntityNews
    pools: _EntityPools
    users: _EntityUsers
    ue_keys: np.ndarray  # sorted user * E + entity of the history's mentions
    uc_keys: np.ndarray  # sorted user * n_cl + cluster of the history's mentions

    def prob(self, ru: np.ndarray, rt: np.ndarray, rn: np.ndarray) -> np.ndarray:
        """P(click) = sigmoid(base + w_same * same + w_rel * rel + a_u[cat(c)] + g[sub(c)])."""
        cfg, en, n_ent, n_cl = self.cfg, self.en, len(self.world.cluster), self.world.n_cl
        row = np.repeat(np.arange(len(rn)), np.diff(en.ment_ptr)[rn])
        e = en.ment_ent[_expand(en.ment_ptr, rn)]
        same = (
            np.bincount(row, weights=_isin_sorted(ru[row] * n_ent + e, self.ue_keys), minlength=len(rn)) > 0
        )
        rel = (
            np.bincount(
                row,
                weights=_isin_sorted(ru[row] * n_cl + self.world.cluster[e], self.uc_keys),
                minlength=len(rn),
            )
            > 0
        )
        logit = (
            cfg.base_logit
            + cfg.same_entity_weight * same
            + cfg.related_entity_weight * rel
            + self.users.aff[ru, en.cat[rn]]
            + self.users.g_sub[en.news.sub[rn]]
        )
        return _sigmoid(logit)

    def draw(self, rng: np.random.Generator, ru: np.ndarray, rt: np.ndarray) -> np.ndarray:
        """Candidates sharing an entity / a cluster with a random history item, of an affine category, or any."""
        cfg, en, pools, ent_cluster = self.cfg, self.en, self.pools, self.world.cluster
        lo = rt - 2 * DAY
        kind = rng.random(len(ru))
        hpos = _pick_in_csr(rng, self.users.hist_ptr, ru)
        hn = np.where(hpos >= 0, self.users.hist[np.maximum(hpos, 0)], -1)
        mpos = _pick_in_csr(rng, en.ment_ptr, hn)
        e = np.where(mpos >= 0, en.ment_ent[np.maximum(mpos, 0)], -1)
        c1 = cfg.cand_same_entity
        c2 = c1 + cfg.cand_related
        c3 = c2 + cfg.cand_category
        return np.where(
            kind < c1,
            pools.by_ent.draw(rng, e, lo, rt),
            np.where(
                kind < c2,
                pools.by_cluster.draw(rng, np.where(e >= 0, ent_cluster[np.maximum(e, 0)], -1), lo, rt),
                np.where(
                    kind < c3,
                    pools.by_cat.draw(rng, _categorical(rng, self.users.aff_p, ru), lo, rt),
                    pools.uniform.draw(rng, np.zeros(len(ru), np.int64), lo, rt),
                ),
            ),
        )


def _entity_clicks(
    cfg: EntityConfig, world: _Entities, en: _EntityNews, pools: _EntityPools, users: _EntityUsers
) -> _EntityClicks:
    """The click model, with its membership tables: (user, entity) and (user, cluster) pairs of the history."""
    hist_ptr, hist = users.hist_ptr, users.hist
    h_user = np.repeat(np.arange(cfg.users), np.diff(hist_ptr))
    h_ment = np.repeat(np.arange(len(hist)), np.diff(en.ment_ptr)[hist])
    h_ment_ent = en.ment_ent[_expand(en.ment_ptr, hist)]
    ue_keys = _member_keys(h_user[h_ment], h_ment_ent, len(world.cluster))
    uc_keys = _member_keys(h_user[h_ment], world.cluster[h_ment_ent], world.n_cl)
    return _EntityClicks(cfg, world, en, pools, users, ue_keys, uc_keys)


def _entity_vectors(rng: np.random.Generator, cfg: EntityConfig, world: _Entities) -> np.ndarray:
    """Entity vectors: noisy reflections of cluster, category and type."""
    dim = cfg.embedding_dim

    def unit(n: int) -> np.ndarray:
        v = rng.normal(size=(n, dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return (
        cfg.embedding_cluster * unit(world.n_cl)[world.cluster]
        + cfg.embedding_category * unit(N_CAT)[world.cat]
        + cfg.embedding_type * unit(3)[world.type]
        + cfg.embedding_noise * unit(len(world.cluster))
    ) * 0.3


def entity(out: str | Path, cfg: EntityConfig = EntityConfig()) -> dict:
    """Clicks follow entities of specific history items, a hidden entity graph and category affinity.

    World: entities (people P, organisations O, places G; invented names, ids Q<number>) fall into
    hidden clusters K(e) of 3-8 related entities (a team, its players, its city, its sponsor; 20%
    of members from another category). A news has 1-3 entities E(n): the first drawn by
    (Zipf-like) entity popularity, fixing the news' category; the others from the same cluster
    with probability 0.6. The title names them in generic phrasing ("X signs deal with Y"), with
    one topic word of the subcategory for 40% of news; title_entities lists them (MIND JSON).

    Users: a random category affinity a_u[k] ~ N(0, 1.1^2), independent of semantics; 1-3
    followed clusters F_u drawn via categories ~ softmax(a_u). History items: 50% news of F_u,
    40% news of a category ~ softmax(a_u), 10% any news (all published before the logs).
    Logging policy: 8% of candidate slots share an entity with a random history item, 15% its
    cluster, 25% come from a category ~ softmax(a_u), the rest uniform.

    Click model, with H_u the history, E(H_u) its entities and K(H_u) their clusters:

        same(u, c) = 1[E(c) & E(H_u) non-empty]               (an entity of a history item)
        rel(u, c)  = 1[K(E(c)) & K(E(H_u)) non-empty]          (related to one; same => rel)
        logit      = base + w_same * same + w_rel * rel + a_u[cat(c)] + g[sub(c)]
        P(click)   = sigmoid(logit)

    base = -4.9, w_rel = 1.6, w_same = 0.6 (so +2.2 for the same entity, +1.6 for a related one),
    g[s] ~ N(0, 0.3^2) a global subcategory bias.

    Entity vectors (entity_embedding.vec, 100 floats) reflect the graph only noisily:
    v_e = 0.55 d_K(e) + 0.3 d_cat(e) + 0.3 d_type(e) + 1.0 noise (unit random directions): same-
    cluster entities have cosine ~0.26 (others ~0.04 +- 0.1); an entity's nearest neighbour is in
    its cluster about half the time. Co-mentions in titles reveal the graph too.
    """
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_news = int(cfg.news_base + cfg.news_per_user * cfg.users)
    world = _entity_world(rng, cfg, max(60, int(n_news / cfg.news_per_entity)))
    en = _entity_news(rng, cfg, world, n_news)
    pools = _entity_pools(world, en)
    users = _entity_users(rng, cfg, world, pools, en.news.time)
    clicks = _entity_clicks(cfg, world, en, pools, users)
    hk = _hist_keys(users.hist_ptr, users.hist, n_news)
    sched = _schedule(rng, cfg.users, cfg.train_days)
    logs = _simulate(rng, sched, n_news, pools.uniform, clicks.draw, clicks.prob, hk)
    vecs = _entity_vectors(rng, cfg, world)
    c_ptr, members = world.cl_ptr, world.cl_members
    clusters = [[world.qids[e] for e in members[c_ptr[c] : c_ptr[c + 1]].tolist()] for c in range(world.n_cl)]
    embedding = (world.qids, vecs, en.ents_of)
    truth = {"entity_clusters": clusters}
    return _write(
        out, rng, "entity", cfg, en.news, users.hist_ptr, users.hist, logs, cfg.train_days, embedding, truth
    )


def _expand(ptr: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Positions ptr[o]:ptr[o+1] of each owner in turn, concatenated."""
    owners = np.asarray(owners, np.int64)
    lengths = ptr[owners + 1] - ptr[owners]
    starts = np.repeat(ptr[owners] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(int(lengths.sum()))


def _entity_title(
    rng: np.random.Generator,
    ents: list[int],
    names: list[str],
    ent_type: np.ndarray,
    sub: int,
    topic_rate: float,
) -> tuple[str, list[tuple[int, int, str]]]:
    """A generic title naming `ents`; returns the title and (entity, char offset, surface form) per mention."""
    verb, noun = str(rng.choice(W.ENTITY_VERBS)), str(rng.choice(W.ENTITY_NOUNS))
    a = ents[0]
    if len(ents) == 1:
        parts = [[a, verb, noun], ["why", a, verb, noun], [noun, "for", a]][int(rng.integers(0, 3))]
    elif len(ents) == 2:
        b = ents[1]
        parts = [[a, verb, b], [a, verb, noun, "with", b], [a, verb, b, "in", noun]][int(rng.integers(0, 3))]
    else:
        b, c = ents[1], ents[2]
        parts = [[a, verb, noun, "with", b, "and", c], [a, verb, b, "and", c]][int(rng.integers(0, 2))]
    if rng.random() < topic_rate:
        parts += [str(rng.choice(W.CONNECTORS)), "the", str(rng.choice(_TOPICS[sub][2]))]
    elif rng.random() < 0.5:
        parts += [str(rng.choice(W.TIME_PHRASES))]
    text, mentions = "", []
    for k, p in enumerate(parts):
        if k:
            text += " "
        if isinstance(p, int):
            form = names[p]
            if ent_type[p] == 0 and rng.random() < 0.5:
                form = form.split(" ", 1)[1]  # a person by surname
            mentions.append((p, len(text), form))
            text += form
        else:
            text += p.capitalize() if k == 0 else p
    return text, mentions


def _entity_json(
    mentions: list[tuple[int, int, str]], names: list[str], ent_type: np.ndarray, qids: list[str]
) -> str:
    by_ent: dict[int, dict] = {}
    for e, off, form in mentions:
        d = by_ent.setdefault(
            e,
            {
                "Label": names[e],
                "Type": ("P", "O", "G")[int(ent_type[e])],
                "WikidataId": qids[e],
                "Confidence": 1.0,
                "OccurrenceOffsets": [],
                "SurfaceForms": [],
            },
        )
        d["OccurrenceOffsets"].append(off)
        d["SurfaceForms"].append(form)
    return json.dumps(list(by_ent.values()), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Users with several interests of different strengths (shared by "drift" and "novelty")
# --------------------------------------------------------------------------------------------


def _interest_sets(
    rng: np.random.Generator, users: int, k_min: int, k_max: int, keep: float
) -> tuple[np.ndarray, np.ndarray]:
    """Past and current interest strengths [U, N_SUB] (rows sum to 1; Gamma(1) weights).

    Past: k in [k_min, k_max] random subcategories. Current: each past interest kept with
    probability `keep`, then new subcategories added up to k' in [k_min, k_max]."""
    rank = np.argsort(np.argsort(rng.random((users, N_SUB)), axis=1), axis=1)
    k_past = rng.integers(k_min, k_max + 1, users)[:, None]
    k_cur = rng.integers(k_min, k_max + 1, users)[:, None]
    past = rank < k_past
    kept = past & (rng.random((users, N_SUB)) < keep)
    need = np.maximum(k_cur - kept.sum(axis=1, keepdims=True), 0)
    cur = kept | ((rank >= k_past) & (rank < k_past + need))

    def strengths(mask: np.ndarray) -> np.ndarray:
        w = rng.gamma(1.0, 1.0, mask.shape) * mask
        return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)

    return strengths(past), strengths(cur)


def _history_by_subcategory(
    rng: np.random.Generator,
    lengths: np.ndarray,
    profile_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
    by_sub: _Pool,
    noise: float,
    history_days: int,
) -> tuple[np.ndarray, np.ndarray]:
    """History clicks: item j of user u at a time t uniform in the history window, of subcategory
    ~ profile_at(users, t) (a [n, N_SUB] probability table) or uniform with probability `noise`,
    on a news of that subcategory published in the day before t (or, if there is none, in the
    history window)."""
    hu = np.repeat(np.arange(len(lengths)), lengths)
    t = START - rng.integers(1, history_days * DAY, len(hu))
    sub = _categorical(rng, profile_at(hu, t), np.arange(len(hu)))
    noisy = rng.random(len(hu)) < noise
    sub[noisy] = rng.integers(0, N_SUB, int(noisy.sum()))
    hn = by_sub.draw(rng, sub, t - DAY, t)
    miss = hn < 0
    lo = np.full(int(miss.sum()), START - history_days * DAY)
    hn[miss] = by_sub.draw(rng, sub[miss], lo, np.full(len(lo), START))
    return hu, hn


def _other_category_map(rng: np.random.Generator) -> np.ndarray:
    """A random permutation f of subcategories with cat(f(s)) != cat(s) for every s."""
    while True:
        f = rng.permutation(N_SUB)
        if (_SUB_CAT[f] != _SUB_CAT).all():
            return f


# --------------------------------------------------------------------------------------------
# "drift": drifting multi-interest users, a two-hop subcategory map, popularity over age
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    users: int = 2000
    seed: int = 0
    train_days: int = 6
    history_days: int = 14
    news_base: int = 400
    news_per_user: float = 1.0
    min_interests: int = 2
    max_interests: int = 4
    keep_interest: float = 0.4  # chance that a past interest is still a current one
    max_history: int = 40
    empty_history: float = 0.03
    history_noise: float = 0.1
    recency_tau: float = 4.0  # history position weight exp(-(items after it) / tau)
    base_logit: float = -5.3
    interest_weight: float = 3.2
    twohop_weight: float = 2.4
    hook_rate: float = 0.25  # titles with an attention hook ("shocking", ...)
    hook_effect: float = 0.8
    appeal_std: float = 0.6
    age_rise: float = 0.8  # A(age) = age_rise * ln(1 + age / 2h) - age / age_decay_hours
    age_decay_hours: float = 16.0
    category_bias_std: float = 0.3
    cand_history: float = 0.3  # candidate slots from the subcategory of a random history item
    cand_twohop: float = 0.12  # ... from f(that subcategory); the rest uniform


def _drift_news(rng: np.random.Generator, cfg: DriftConfig, n_news: int) -> tuple[_News, np.ndarray]:
    """News: times, subcategories (of varying sizes), titles (25% with a hook) and appeal q_n."""
    times = _news_times(rng, n_news, cfg.history_days, cfg.train_days)
    sub_w = rng.lognormal(0.0, 0.5, N_SUB)
    sub = rng.choice(N_SUB, n_news, p=sub_w / sub_w.sum())
    hook = rng.random(n_news) < cfg.hook_rate
    appeal = cfg.hook_effect * hook + rng.normal(0.0, cfg.appeal_std, n_news)
    titles, abstracts = [], []
    for i in range(n_news):
        s = int(sub[i])
        t = _topic_title(rng, s, int(rng.integers(2, 4)))
        titles.append(f"{rng.choice(W.HOOKS).capitalize()} {t}" if hook[i] else t.capitalize())
        w1, w2 = rng.choice(_TOPICS[s][2], 2, replace=False)
        abstracts.append("" if rng.random() < 0.3 else f"More on {w1} and {w2} in {_TOPICS[s][1]}.")
    return _News(times, sub, titles, abstracts), appeal


def _drift_history(
    rng: np.random.Generator, cfg: DriftConfig, times: np.ndarray, by_sub: _Pool
) -> tuple[np.ndarray, np.ndarray]:
    """Histories drifting from past to current interests (CSR by user, oldest first)."""
    U = cfg.users
    past, cur = _interest_sets(rng, U, cfg.min_interests, cfg.max_interests, cfg.keep_interest)
    h0 = START - cfg.history_days * DAY

    def profile_at(users: np.ndarray, t: np.ndarray) -> np.ndarray:
        x = ((t - h0) / (cfg.history_days * DAY))[:, None]
        return (1.0 - x) * past[users] + x * cur[users]

    lengths = _users_history(rng, U, 3, cfg.max_history, cfg.empty_history)
    hu, hn = _history_by_subcategory(rng, lengths, profile_at, by_sub, cfg.history_noise, cfg.history_days)
    return _finish_history(U, hu, hn, times)


def _recency_profile(
    hist_ptr: np.ndarray, hist: np.ndarray, sub: np.ndarray, users: int, tau: float
) -> np.ndarray:
    """The recency-weighted history profile m_u [U, N_SUB], normalised by its max."""
    h_user = np.repeat(np.arange(users), np.diff(hist_ptr))
    after = hist_ptr[h_user + 1] - 1 - np.arange(len(hist))
    w = np.exp(-after / tau)
    prof = np.bincount(h_user * N_SUB + sub[hist], weights=w, minlength=users * N_SUB).reshape(users, N_SUB)
    prof /= np.maximum(prof.max(axis=1, keepdims=True), 1e-12)
    return prof


@dataclass
class _DriftClicks:
    """The click model (`prob`) and the logging policy (`draw`) of "drift"."""

    cfg: DriftConfig
    news: _News
    appeal: np.ndarray  # [N] q_n
    cat_bias: np.ndarray  # [N_CAT] b
    f: np.ndarray  # [N_SUB] the hidden two-hop map
    f_inv: np.ndarray
    uniform: _Pool
    by_sub: _Pool
    hist_ptr: np.ndarray
    hist: np.ndarray
    prof: np.ndarray  # [U, N_SUB] m_u

    def prob(self, ru: np.ndarray, rt: np.ndarray, rn: np.ndarray) -> np.ndarray:
        """P(click) = sigmoid(base + alpha m_u(s) + beta m_u(f^-1(s)) + q_c + A(age_c) + b[cat(c)])."""
        cfg, prof = self.cfg, self.prof
        age_h = (rt - self.news.time[rn]) / HOUR
        s = self.news.sub[rn]
        logit = (
            cfg.base_logit
            + cfg.interest_weight * prof[ru, s]
            + cfg.twohop_weight * prof[ru, self.f_inv[s]]
            + self.appeal[rn]
            + cfg.age_rise * np.log1p(age_h / 2.0)
            - age_h / cfg.age_decay_hours
            + self.cat_bias[_SUB_CAT[s]]
        )
        return _sigmoid(logit)

    def draw(self, rng: np.random.Generator, ru: np.ndarray, rt: np.ndarray) -> np.ndarray:
        """Candidates of the subcategory of a random history item, of f of it, or any."""
        cfg, f = self.cfg, self.f
        lo = rt - 2 * DAY
        kind = rng.random(len(ru))
        hpos = _pick_in_csr(rng, self.hist_ptr, ru)
        hs = np.where(hpos >= 0, self.news.sub[self.hist[np.maximum(hpos, 0)]], -1)
        target = np.where(kind < cfg.cand_history, hs, np.where(hs >= 0, f[np.maximum(hs, 0)], -1))
        return np.where(
            kind < cfg.cand_history + cfg.cand_twohop,
            self.by_sub.draw(rng, target, lo, rt),
            self.uniform.draw(rng, np.zeros(len(ru), np.int64), lo, rt),
        )


def _drift_clicks(
    rng: np.random.Generator, cfg: DriftConfig, news: _News, appeal: np.ndarray
) -> _DriftClicks:
    """Category biases, the two-hop map, users and histories, and the click model built on them."""
    n_news, times, sub = len(news.time), news.time, news.sub
    cat_bias = rng.normal(0.0, cfg.category_bias_std, N_CAT)
    f = _other_category_map(rng)
    f_inv = np.argsort(f)
    uniform = _Pool(np.arange(n_news), np.zeros(n_news, np.int64), times)
    by_sub = _Pool(np.arange(n_news), sub, times)
    hist_ptr, hist = _drift_history(rng, cfg, times, by_sub)
    prof = _recency_profile(hist_ptr, hist, sub, cfg.users, cfg.recency_tau)
    return _DriftClicks(cfg, news, appeal, cat_bias, f, f_inv, uniform, by_sub, hist_ptr, hist, prof)


def drift(out: str | Path, cfg: DriftConfig = DriftConfig()) -> dict:
    """Drifting multi-interest users + a hidden two-hop subcategory map + popularity over age.

    News: subcategory s(n) (category sizes vary), a title of 2-3 topic words of s(n) plus fillers;
    25% of titles open with a hook word; appeal q_n = 0.8 * hook_n + N(0, 0.6^2).

    Users: past interests P_u and current interests C_u (2-4 subcategories each, Gamma(1)
    strengths; a past interest stays current with probability 0.4). A history click at time t in
    the 14 days before the logs has subcategory ~ (1 - x) P_u + x C_u, x = (t - t_first) / 14 days,
    (10% noise), so the history drifts from old to current interests; it is listed oldest first.

    Click model, from the L history items h_1..h_L (oldest first) only:

        w_j       = exp(-(L - j) / tau),  tau = 4 items        (recency)
        m_u(s)    = sum_j w_j 1[s(h_j) = s] / max_s' sum_j w_j 1[s(h_j) = s']   (in [0, 1])
        logit     = base + alpha * m_u(s(c)) + beta * m_u(f^-1(s(c)))          (direct + two-hop)
                    + q_c + A(age_c) + b[cat(c)]
        A(a)      = 0.8 ln(1 + a / 2h) - a / 16h    (rises for ~10 h, then decays; a <= 48 h)

    base = -5.3, alpha = 3.2, beta = 2.4, f a hidden random permutation of subcategories that
    always changes the category (a reader of subcategory A is drawn to B = f(A)),
    b[k] ~ N(0, 0.3^2). Logging policy: 30% of candidate slots from the subcategory of a random
    history item (old interests included), 12% from f of it, the rest uniform. Recoverable: m_u
    from the history order, f from training clicks, q from titles (hooks) and training clicks,
    age from when a news first shows up in the logs.
    """
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_news = int(cfg.news_base + cfg.news_per_user * cfg.users)
    news, appeal = _drift_news(rng, cfg, n_news)
    m = _drift_clicks(rng, cfg, news, appeal)
    hk = _hist_keys(m.hist_ptr, m.hist, n_news)
    logs = _simulate(rng, _schedule(rng, cfg.users, cfg.train_days), n_news, m.uniform, m.draw, m.prob, hk)
    twohop = {_TOPICS[a][1]: _TOPICS[int(m.f[a])][1] for a in range(N_SUB)}
    return _write(
        out, rng, "drift", cfg, news, m.hist_ptr, m.hist, logs, cfg.train_days, truth={"twohop": twohop}
    )


# --------------------------------------------------------------------------------------------
# "novelty": running stories, fatigue on what was read, updates and explainers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoveltyConfig:
    users: int = 2000
    seed: int = 0
    train_days: int = 6
    history_days: int = 7
    news_base: int = 400
    news_per_user: float = 1.0
    articles_per_story_day: float = 1.0  # stories running at once in a subcategory: news per day / this,
    min_running: float = 1.5  # clipped to [min_running, max_running]
    max_running: float = 8.0
    story_days_min: float = 2.0  # story lifetimes: log-uniform in [min, max] days
    story_days_max: float = 30.0
    update_share: float = 0.2  # titles that bring news on the story ("Breaking: ...")
    explainer_share: float = 0.2  # titles that retell it ("...: what we know")
    min_interests: int = 2
    max_interests: int = 4
    max_history: int = 30
    empty_history: float = 0.03
    history_noise: float = 0.1
    base_logit: float = -4.8
    interest_weight: float = 2.6
    seen_plain: float = -2.5
    seen_update: float = 1.2
    seen_explainer: float = -3.5
    new_update: float = -0.3
    new_explainer: float = 0.7
    category_bias_std: float = 0.3
    cand_interest: float = 0.3  # candidate slots from a subcategory ~ the user's interests
    cand_story: float = 0.3  # ... from the story of a random history item; the rest uniform


_PLAIN, _UPDATE, _EXPLAINER = 0, 1, 2


@dataclass
class _StoryBook:
    """The running stories of "novelty" (subcategory, signature word, invented name) and each news' story."""

    story: np.ndarray  # [N] story of each news
    sub: list[int] = field(default_factory=list)
    sig: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    taken: set[tuple[int, str, str]] = field(default_factory=set)

    def new(self, rng: np.random.Generator, s: int) -> int:
        """Start a new story in subcategory `s` (a name and signature word not used there yet)."""
        while True:
            name = f"{rng.choice(W.NAME_HEADS)}{rng.choice(W.SURNAME_TAILS + W.PLACE_TAILS)}"
            sig = str(rng.choice(_TOPICS[s][2]))
            if (s, name, sig) not in self.taken:
                self.taken.add((s, name, sig))
                self.sub.append(s)
                self.sig.append(sig)
                self.name.append(name)
                return len(self.sub) - 1


def _run_stories(
    rng: np.random.Generator,
    cfg: NoveltyConfig,
    book: _StoryBook,
    s: int,
    rows: np.ndarray,
    times: np.ndarray,
    rate: float,
    window: tuple[int, int],
) -> None:
    """Stories of subcategory `s` (a Poisson process, log-uniform lifetimes); assign its news `rows`."""
    t_lo, t_hi = window
    lmin, lmax = np.log(cfg.story_days_min * DAY), np.log(cfg.story_days_max * DAY)
    span = t_hi - (t_lo - cfg.story_days_max * DAY)
    k = max(1, int(rng.poisson(rate * span / DAY)))
    start = t_lo - cfg.story_days_max * DAY + rng.integers(0, int(span), k)
    end = start + np.exp(rng.uniform(lmin, lmax, k)).astype(np.int64)
    size = rng.lognormal(0.0, 0.7, k)
    ids = np.array([book.new(rng, s) for _ in range(k)])
    t = times[rows]
    wts = ((start[None, :] <= t[:, None]) & (t[:, None] < end[None, :])) * size[None, :]
    tot = wts.sum(axis=1)
    pick = (np.cumsum(wts, axis=1) < (rng.random(len(rows)) * tot)[:, None]).sum(axis=1)
    book.story[rows] = ids[np.minimum(pick, k - 1)]
    for r in rows[tot == 0].tolist():  # no story running: this news starts one
        book.story[r] = book.new(rng, s)


def _novelty_stories(
    rng: np.random.Generator, cfg: NoveltyConfig, times: np.ndarray, sub: np.ndarray
) -> _StoryBook:
    """The stories of every subcategory (about news-per-day / articles_per_story_day run at once)."""
    n_news = len(times)
    t_lo, t_hi = START - cfg.history_days * DAY, START + (cfg.train_days + 1) * DAY
    per_sub_day = n_news / N_SUB / ((t_hi - t_lo) / DAY)
    running = float(np.clip(per_sub_day / cfg.articles_per_story_day, cfg.min_running, cfg.max_running))
    mean_life = (cfg.story_days_max - cfg.story_days_min) / np.log(cfg.story_days_max / cfg.story_days_min)
    rate = running / mean_life  # new stories per day and subcategory
    book = _StoryBook(np.zeros(n_news, np.int64))
    for s in range(N_SUB):
        _run_stories(rng, cfg, book, s, np.flatnonzero(sub == s), times, rate, (t_lo, t_hi))
    return book


def _novelty_title(rng: np.random.Generator, book: _StoryBook, s: int, st: int, kind: int) -> tuple[str, str]:
    """A title (story name, signature word, 1-2 topic words, a filler; marked by kind) and an abstract."""
    others = [w for w in _TOPICS[s][2] if w != book.sig[st]]
    rest = list(rng.choice(others, int(rng.integers(1, 3)), replace=False)) + [str(rng.choice(_FILLERS))]
    core = f"{book.name[st]} {book.sig[st]} " + " ".join(rest[j] for j in rng.permutation(len(rest)))
    if kind == _UPDATE:
        title = f"{str(rng.choice(W.UPDATE_MARKERS)).capitalize()}: {core}"
    elif kind == _EXPLAINER:
        title = f"{core[0].upper()}{core[1:]}: {rng.choice(W.EXPLAINER_MARKERS)}"
    else:
        title = core[0].upper() + core[1:]
    abstract = "" if rng.random() < 0.4 else f"The {book.name[st]} {book.sig[st]} story in {_TOPICS[s][1]}."
    return title, abstract


def _novelty_news(
    rng: np.random.Generator, cfg: NoveltyConfig, times: np.ndarray, sub: np.ndarray, book: _StoryBook
) -> tuple[_News, np.ndarray]:
    """The kind of each news (update, explainer, plain) and its title and abstract."""
    n_news = len(times)
    r = rng.random(n_news)
    kind = np.where(
        r < cfg.update_share,
        _UPDATE,
        np.where(r < cfg.update_share + cfg.explainer_share, _EXPLAINER, _PLAIN),
    )
    titles, abstracts = [], []
    for i in range(n_news):
        title, abstract = _novelty_title(rng, book, int(sub[i]), int(book.story[i]), int(kind[i]))
        titles.append(title)
        abstracts.append(abstract)
    return _News(times, sub, titles, abstracts), kind


@dataclass
class _NoveltyClicks:
    """The click model (`prob`) and the logging policy (`draw`) of "novelty"."""

    cfg: NoveltyConfig
    news: _News
    story: np.ndarray  # [N]
    kind: np.ndarray  # [N] k(n)
    n_story: int
    cat_bias: np.ndarray  # [N_CAT] b
    pi: np.ndarray  # [U, N_SUB] interest strengths
    interest: np.ndarray  # [U, N_SUB] I_u
    hist_ptr: np.ndarray
    hist: np.ndarray
    seen_keys: np.ndarray  # sorted user * n_story + story of the history
    uniform: _Pool
    by_sub: _Pool
    by_story: _Pool

    def prob(self, ru: np.ndarray, rt: np.ndarray, rn: np.ndarray) -> np.ndarray:
        """P(click) = sigmoid(base + alpha I_u(s(c)) + b[cat(c)] + (phi if seen else psi)[k(c)])."""
        cfg, sub = self.cfg, self.news.sub
        phi = np.array([cfg.seen_plain, cfg.seen_update, cfg.seen_explainer])
        psi = np.array([0.0, cfg.new_update, cfg.new_explainer])
        seen = _isin_sorted(ru * self.n_story + self.story[rn], self.seen_keys)
        k = self.kind[rn]
        logit = (
            cfg.base_logit
            + cfg.interest_weight * self.interest[ru, sub[rn]]
            + self.cat_bias[_SUB_CAT[sub[rn]]]
            + np.where(seen, phi[k], psi[k])
        )
        return _sigmoid(logit)

    def draw(self, rng: np.random.Generator, ru: np.ndarray, rt: np.ndarray) -> np.ndarray:
        """Candidates of a subcategory ~ pi_u, of the story of a random history item, or any."""
        cfg = self.cfg
        lo = rt - 2 * DAY
        u = rng.random(len(ru))
        hpos = _pick_in_csr(rng, self.hist_ptr, ru)
        hst = np.where(hpos >= 0, self.story[self.hist[np.maximum(hpos, 0)]], -1)
        return np.where(
            u < cfg.cand_interest,
            self.by_sub.draw(rng, _categorical(rng, self.pi, ru), lo, rt),
            np.where(
                u < cfg.cand_interest + cfg.cand_story,
                self.by_story.draw(rng, hst, lo, rt),
                self.uniform.draw(rng, np.zeros(len(ru), np.int64), lo, rt),
            ),
        )


def _novelty_clicks(
    rng: np.random.Generator, cfg: NoveltyConfig, news: _News, kind: np.ndarray, book: _StoryBook
) -> _NoveltyClicks:
    """Category biases, users (interests, histories, stories seen) and the click model built on them."""
    U, n_news, times, sub, story = cfg.users, len(news.time), news.time, news.sub, book.story
    cat_bias = rng.normal(0.0, cfg.category_bias_std, N_CAT)
    uniform = _Pool(np.arange(n_news), np.zeros(n_news, np.int64), times)
    by_sub = _Pool(np.arange(n_news), sub, times)
    by_story = _Pool(np.arange(n_news), story, times)
    _, pi = _interest_sets(rng, U, cfg.min_interests, cfg.max_interests, 0.0)
    interest = pi / pi.max(axis=1, keepdims=True)
    lengths = _users_history(rng, U, 3, cfg.max_history, cfg.empty_history)
    hu, hn = _history_by_subcategory(
        rng, lengths, lambda users, t: pi[users], by_sub, cfg.history_noise, cfg.history_days
    )
    hist_ptr, hist = _finish_history(U, hu, hn, times)
    h_user = np.repeat(np.arange(U), np.diff(hist_ptr))
    n_story = len(book.sub)
    seen_keys = _member_keys(h_user, story[hist], n_story)
    return _NoveltyClicks(
        cfg,
        news,
        story,
        kind,
        n_story,
        cat_bias,
        pi,
        interest,
        hist_ptr,
        hist,
        seen_keys,
        uniform,
        by_sub,
        by_story,
    )


def novelty(out: str | Path, cfg: NoveltyConfig = NoveltyConfig()) -> dict:
    """Users want new stories on their topics: fatigue on stories already read, updates, explainers.

    News: each subcategory runs stories (an invented name + a signature topic word, e.g.
    "Harwick robbery"), started as a Poisson process and living log-uniform 2-30 days (about
    news-per-day stories run at once, 1.5-8); a news belongs to a story running in its
    subcategory when it is published. Titles: story name,
    signature word, 1-2 more topic words and a filler; kind k(n): 20% updates ("Breaking: ..."),
    20% explainers ("...: what we know"), 60% plain.

    Users: 2-4 interests with strengths pi_u (Gamma(1), normalised); I_u(s) = pi_u(s) / max pi_u.
    History: 3-30 clicks in the 7 days before the logs, subcategory ~ pi_u (10% noise), on news
    published the day before the click; so a story running into the logs may already be read.

    Click model, with seen(u, c) = 1[story(c) is the story of some history item of u]:

        logit = base + alpha * I_u(s(c)) + b[cat(c)]
                + seen * phi[k(c)] + (1 - seen) * psi[k(c)]
        phi   = {plain: -2.5, update: +1.2, explainer: -3.5}   (fatigue; updates welcome)
        psi   = {plain:  0.0, update: -0.3, explainer: +0.7}   (explainers help newcomers)

    base = -4.8, alpha = 2.6, b[k] ~ N(0, 0.3^2). A title-similarity ranker puts the read stories
    first, which is right only for updates. Logging policy: 30% of candidate slots from a
    subcategory ~ pi_u, 30% from the story of a random history item, the rest uniform.
    Recoverable: I_u from the history's subcategories, seen from the story name and word shared
    with a history title, k from the title's markers.
    """
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_news = int(cfg.news_base + cfg.news_per_user * cfg.users)
    times = _news_times(rng, n_news, cfg.history_days, cfg.train_days)
    sub = rng.integers(0, N_SUB, n_news)
    book = _novelty_stories(rng, cfg, times, sub)
    news, kind = _novelty_news(rng, cfg, times, sub, book)
    m = _novelty_clicks(rng, cfg, news, kind, book)
    hk = _hist_keys(m.hist_ptr, m.hist, n_news)
    logs = _simulate(rng, _schedule(rng, cfg.users, cfg.train_days), n_news, m.uniform, m.draw, m.prob, hk)
    return _write(
        out, rng, "novelty", cfg, news, m.hist_ptr, m.hist, logs, cfg.train_days, truth={"stories": m.n_story}
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def story(out: str | Path, users: int, seed: int) -> dict:
    """`rmbert.data.synth.synth` (the "story" generator), with "generator" added to oracle.json."""
    cfg = SynthConfig(users=users, seed=seed)
    meta = synth(out, cfg)
    meta = {"generator": "story", "config": asdict(cfg), "oracle": meta["oracle"], "news": meta["news"]}
    (Path(out) / "oracle.json").write_text(json.dumps(meta, indent=2))
    return meta


GENERATORS: dict[str, Callable[[Path, int, int], dict]] = {
    "story": story,
    "entity": lambda out, users, seed: entity(out, EntityConfig(users=users, seed=seed)),
    "drift": lambda out, users, seed: drift(out, DriftConfig(users=users, seed=seed)),
    "novelty": lambda out, users, seed: novelty(out, NoveltyConfig(users=users, seed=seed)),
}

# Logged training impressions per user with the default configs (measured; see users_for).
_TRAIN_IMPRESSIONS_PER_USER = {"story": 2.97, "entity": 2.96, "drift": 2.97, "novelty": 2.95}


def users_for(name: str, train_impressions: int) -> int:
    """How many users to ask generator `name` for to get about `train_impressions` training impressions."""
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    return max(10, round(train_impressions / _TRAIN_IMPRESSIONS_PER_USER[name]))
