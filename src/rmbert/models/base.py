"""The one recommender interface shared by training, evaluation and serving.

Shape letters: B users (impressions), C candidates, M history items, L title tokens, D hidden.

A recommender splits scoring in two so that serving computes the user side once per request:
    state  = rec.user_state(history: NewsRepr with cls [B, M, D] (tokens [B, M, L, D] only if
                            rec.needs_history_tokens), hist_mask [B, M], users [B])
    logits = rec.score_candidates(state, candidates: NewsRepr with cls [B, C, D],
                                  tokens [B, C, L, D], mask [B, C, L])      -> [B, C]
"""

from __future__ import annotations

import dataclasses
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from rmbert.models.tables import TITLE_TABLES
from rmbert.types import NewsRepr, Scores

NEG = -1e9  # added to masked attention logits (finite, so fully masked rows give no NaN)


class InferenceForm(ABC):
    """How serving scores with a trained recommender: per-news terms computed once when a news
    enters the index (`news_terms`), then `score` per request over clicked news vectors H."""

    token_axes: dict[str, int] = {}  # each news term's number of trailing title-token (L) axes
    # per-news side tables (rmbert.models.tables) that serving builds from each news's metadata;
    # `score` finds the candidates' rows in terms[name] and the clicked news' in terms["history_" + name]
    side_tables: tuple[str, ...] = ()
    # True: `score` reads the clicked news' title tokens, terms["history_tokens"] [B, M, L, D] and
    # terms["history_mask"] [B, M, L]
    history_tokens: bool = False
    # False: `score` reads the candidates' news terms alone, never their title tokens (cand.tokens
    # and cand.mask may be None)
    candidate_tokens: bool = True
    record_terms: tuple[str, ...] = ()  # news terms that `score` reads only when it records attentions
    # features the retrieval proxy adds, from the side tables named in `proxy_tables`:
    # (those tables' rows of G news, of one user's M clicks) -> [G, k] (and content_only=,
    # content=: see `content_columns`)
    content_proxy: Callable[..., torch.Tensor] | None = None
    proxy_tables: tuple[str, ...] = ()
    # how many of content_proxy's first columns it also gives alone (content_only=True), cheaper
    # than all of them, for the retrieval's second cut (serve/retrieval.py): 0 for none
    content_columns: int = 0

    def news_terms(self, news: NewsRepr) -> dict[str, torch.Tensor]:
        return {}

    def click_terms(self, x: torch.Tensor, norms: bool = True) -> dict[str, torch.Tensor]:
        """News vectors x [n, D] -> per-news products of x as a click, which serving keeps in
        its index and hands to `score` (`Ranker._click_products`, which knows the folded RMBERT's
        names) instead of computing them per request; none by default."""
        return {}

    def table_terms(self, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-news arrays computed once from the news's side tables [n, ...] when it enters the
        serving index (some of `proxy_tables`); none by default."""
        return {}

    @abstractmethod
    def score(
        self, H: torch.Tensor, mask: torch.Tensor, cand: NewsRepr, terms: dict, record: bool = False
    ) -> Scores:
        """H [B, M, D], mask [B, M], candidates [B, C, ...] -> Scores."""


class GenericInference(InferenceForm):
    """The default inference form: the recommender's own user_state and score_candidates, with
    its side inputs (the tables serving builds, `side_tables`) on `NewsRepr.extra`. Serving
    knows no user ids: a model with a user field scores every request as the unknown user (id 0),
    as it scores users not seen in training."""

    def __init__(
        self, rec: Recommender, embed_words: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self.rec = rec
        self.side_tables = tuple(rec.side_inputs)
        self.token_axes = {k: int(k in TITLE_TABLES) for k in self.side_tables}
        self.history_tokens = rec.needs_history_tokens
        self.candidate_tokens = rec.needs_candidate_tokens
        if rec.word_inputs and embed_words is None:
            raise ValueError(
                f"{rec.name} reads {', '.join(rec.word_inputs)} as words: pass the news side's embed_words"
            )
        self.embed_words = embed_words  # token ids [..., T] -> [..., T, E], as NewsRecModel.add_side

    def _extra(self, terms: dict, prefix: str = "") -> dict:
        extra = {k: terms[prefix + k] for k in self.side_tables}
        for k in self.rec.word_inputs:
            extra[k + "_mask"] = extra[k] > 0
            extra[k] = self.embed_words(extra[k])
        return extra

    @torch.no_grad()
    def score(self, H, mask, cand, terms, record=False) -> Scores:
        hist = NewsRepr(cls=H, tokens=terms.get("history_tokens"), mask=terms.get("history_mask"))
        if self.side_tables:
            hist.extra = self._extra(terms, "history_")
            cand = dataclasses.replace(cand, extra=self._extra(terms))
        state = self.rec.user_state(hist, mask, None)
        return Scores(self.rec.score_candidates(state, cand))


class Recommender(nn.Module, metaclass=ABCMeta):
    name = "base"
    needs_history_tokens = False  # True for models that encode clicked news from their words
    # False for models that read only the candidates' vectors (NRMS, LSTUR, NPA over [CLS]): a
    # frozen news side then gathers no candidate title tokens (cand.tokens and cand.mask are None)
    needs_candidate_tokens = True
    dedup_candidates = False  # True: score_candidates takes unique candidates [U, ...] + NewsRepr.index
    # True: `encode_news` depends on one news alone (its tokens, side inputs and features), so
    # training and evaluation run it once per distinct news of a batch, clicked or candidate, and
    # hand it over as NewsRepr.encoded (`NewsRecModel.forward`); the model reads it via `encoded`
    encodes_news = False
    # Per-news side inputs beyond the news side's vectors, read from NewsRepr.extra (the names of
    # rmbert.models.tables.TABLES); `word_inputs` are those of them that are token ids, which the
    # news side passes embedded ([..., T, E], with "<name>_mask" [..., T]).
    side_inputs: tuple[str, ...] = ()
    word_inputs: tuple[str, ...] = ()
    servable = True  # False: needs side inputs that `rmbert serve` cannot build (models/tables.py)

    @classmethod
    def inputs_for(cls, cfg: Any) -> tuple[str, ...]:
        """The side inputs that a model of config `cfg` reads (by default `side_inputs`)."""
        return cls.side_inputs

    def fit_training_news(self, vocab: Any, tables: dict[str, np.ndarray]) -> None:
        """Fit what the model derives from the training split's news (`tables`: its side-input
        tables for those news only; `vocab`: the FeatureVocab), kept in buffers saved with the
        weights: e.g. DeepFM's IDF, DKN's entity vectors. Nothing by default."""

    def encode_news(self, news: NewsRepr) -> Any:
        """The model's own news encoder, [B, K, ...] news -> [B, K, ...]; only models with
        `encodes_news` have one (RMBERT, NPA and the CTR models score from the shared news side)."""
        raise TypeError(f"{self.name} has no news encoder of its own (encodes_news is False)")

    def encoded(self, news: NewsRepr) -> Any:
        """`encode_news(news)`, or what the batch already computed for these news."""
        return news.encoded if news.encoded is not None else self.encode_news(news)

    @abstractmethod
    def user_state(self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None) -> Any:
        """Everything about the users that does not depend on the candidates."""

    @abstractmethod
    def score_candidates(self, state: Any, cand: NewsRepr) -> torch.Tensor:
        """Click logits [B, C]."""

    def inference_form(
        self, embed_words: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> InferenceForm:
        """The form serving scores with (a folded one where a model has it); eval mode only.
        `embed_words`: the news side's word embedding, for a model with `word_inputs`."""
        if not self.servable:
            raise ValueError(
                f"{self.name} reads per-news side inputs ({', '.join(self.side_inputs) or 'title tokens'}) "
                "that serving does not build: it cannot be served"
            )
        return GenericInference(self, embed_words)

    def scoring_form(self) -> InferenceForm | None:
        """The inference form that evaluation scores a whole split with, each news's terms
        computed once for the split (`NewsRecModel.split_terms`), or None to score batch by batch
        through `forward`. Only a form that is this model's function in eval mode, users included."""
        return None

    def forward(
        self,
        hist: NewsRepr | torch.Tensor,
        hist_mask: torch.Tensor,
        cand: NewsRepr,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C]; `hist` may be the [CLS] vectors alone ([B, M, D])."""
        if isinstance(hist, torch.Tensor):
            hist = NewsRepr(cls=hist, tokens=None, mask=None)
        return self.score_candidates(self.user_state(hist, hist_mask, users), cand)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where mask is True; all-masked rows give zeros."""
    w = torch.softmax(logits.masked_fill(~mask, NEG), dim=-1)
    return w * mask


def masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(logits_j) over the last axis where mask is True; 0 for all-masked rows."""
    lse = torch.logsumexp(logits.masked_fill(~mask, NEG), dim=-1)
    return torch.where(mask.any(-1), lse, torch.zeros_like(lse))


def masked_mean_weights(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform weights over unmasked positions (the w/o Att ablation); all-masked rows give zeros."""
    m = mask.to(dtype)
    return m / m.sum(-1, keepdim=True).clamp(min=1.0)
