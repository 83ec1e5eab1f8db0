"""Explanations: each reasoning step's attention over the clicked news and the title's words."""

from __future__ import annotations

import json

import numpy as np

from rmbert.serve.index import Snapshot


def merge_pieces(tokenizer, ids: np.ndarray, weights: np.ndarray) -> list[tuple[str, float]]:
    """WordPiece tokens -> words, with the weights of a word's pieces summed."""
    words: list[tuple[str, float]] = []
    for tok, w in zip(tokenizer.convert_ids_to_tokens(ids.tolist()), weights.tolist()):
        if tok.startswith("##") and words:
            words[-1] = (words[-1][0] + tok[2:], words[-1][1] + w)
        else:
            words.append((tok, w))
    return words


def news_id(snap: Snapshot, row: int) -> str:
    return snap.info[row].get("id", "")


def steps(
    snap: Snapshot,
    tokenizer,
    row: int,
    hist_rows: np.ndarray,
    title_w: np.ndarray,
    hist_w: np.ndarray,
    Lb: int,
) -> list[dict]:
    """One candidate's explanation: per step, {history: [{id, weight}], title: [{word, weight}]}.
    title_w [p, Lb] and hist_w [p, M] are its recorded attention weights."""
    ids = snap.arrays["input_ids"][row, 1 : Lb + 1]
    mask = snap.arrays["mask"][row, :Lb]
    hist_ids = [news_id(snap, int(r)) for r in hist_rows]
    out = []
    for s in range(len(title_w)):
        words = merge_pieces(tokenizer, ids[mask], title_w[s, :Lb][mask])
        out.append(
            {
                "history": [{"id": i, "weight": float(w)} for i, w in zip(hist_ids, hist_w[s])],
                "title": [{"word": wd, "weight": float(w)} for wd, w in words],
            }
        )
    return out


def ranked_json(
    snap: Snapshot,
    tokenizer,
    cand_rows: np.ndarray,
    hist_rows: np.ndarray,
    scores: np.ndarray,
    order: np.ndarray,
    attention: tuple[np.ndarray, np.ndarray] | None,
    Lb: int,
) -> bytes:
    """The `ranked` list of a /rank answer (schemas.Ranked items), encoded: candidates in `order`
    with id, score, title, category and, given attention (title [C, p, L], history [C, p, M]),
    each step's explanation."""
    items = []
    for c in order:
        r = int(cand_rows[c])
        info = snap.info[r]
        item = {
            "id": news_id(snap, r),
            "score": float(scores[c]),
            "title": info.get("title", ""),
            "category": info.get("category", ""),
        }
        if attention is not None:
            item["steps"] = steps(snap, tokenizer, r, hist_rows, attention[0][c], attention[1][c], Lb)
        items.append(item)
    return json.dumps(items).encode()
