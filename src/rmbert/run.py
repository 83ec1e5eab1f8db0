"""The run folder: everything needed to evaluate, predict, serve or resume a trained model.

RUN/config.json        the resolved RunConfig
RUN/model.safetensors  best weights (recommender; encoder too unless it was frozen)
RUN/tokenizer/         the tokenizer (the encoder itself is the named base when frozen)
RUN/users.txt          training users (models with user embeddings)
RUN/features.json      the news-feature vocabulary (runs with `features.*` switched on)
RUN/popularity.json    training clicks per news (novelty in `rmbert evaluate --beyond`)
RUN/metrics.json, log.csv, curves.png, checkpoint.pt (resume state)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rmbert.assemble import NewsRecModel, build_model, feature_ids, load_encoder, store_for
from rmbert.config import RunConfig
from rmbert.data.batching import ImpressionBatcher
from rmbert.data.mind import Split
from rmbert.encoders.bert import BertNewsEncoder
from rmbert.encoders.store import Encoding, NewsStore
from rmbert.models.features import FeatureVocab


def weights(model: NewsRecModel, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The state to save: everything but an unchanged (frozen) encoder."""
    sd = model.state_dict()
    if cfg.encoder.mode == "frozen":
        sd = {k: v for k, v in sd.items() if not k.startswith("news.encoder.")}
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_weights(model: NewsRecModel, cfg: RunConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(weights(model, cfg), str(tmp))
    tmp.replace(path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, refused (naming the file) when unreadable or not finite: a model with
    NaN or infinite weights would score NaN."""
    try:
        state = load_file(str(path))
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"{path}: unreadable weights ({type(e).__name__}: {str(e)[:200]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {', '.join(bad[:5])}; this model cannot score")
    return state


def load_weights(model: NewsRecModel, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the encoder is the named base when frozen; runs from before standardisation existed load as identity
    identity = {"news.cls_mean", "news.cls_std", "news.tok_mean", "news.tok_std"}
    missing = [k for k in missing if not k.startswith("news.encoder.") and k not in identity]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


@dataclass
class LoadedRun:
    path: Path
    cfg: RunConfig
    model: NewsRecModel
    encoding: Encoding
    user_index: dict[str, int]
    vocab: FeatureVocab | None = None

    @property
    def encoder(self) -> BertNewsEncoder:
        return self.encoding.encoder

    @property
    def tokenizer(self):
        return self.encoding.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.encoding.fingerprint

    def store(self, splits: list[Split], progress: bool = True) -> NewsStore:
        return store_for(self.cfg, self.encoding, splits, progress)

    def batcher(self, split: Split, store: NewsStore) -> ImpressionBatcher:
        self.model.news.set_store(store)
        self.model.set_feature_ids(feature_ids(self.cfg, self.vocab, store, [split], self.tokenizer))
        rows = store.rows(split.news.ids)
        return ImpressionBatcher(split.impressions, rows, self.cfg.train.max_history, self.user_index)


def load_run(path: str | Path, device: torch.device | None = None) -> LoadedRun:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no config.json)")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: run has no model.safetensors (training never finished an epoch)")
    cfg = RunConfig.load(path / "config.json")
    encoder, tokenizer = load_encoder(cfg, path / "tokenizer")
    try:
        users = (
            (path / "users.txt").read_text(encoding="utf-8").split("\n")
            if (path / "users.txt").is_file()
            else []
        )
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'users.txt'}: unreadable ({e})") from None
    user_index = {u: i + 1 for i, u in enumerate(users) if u}
    vocab = FeatureVocab.load(path / "features.json") if cfg.features.any else None
    model = build_model(cfg, encoder, None)
    load_weights(model, read_weights(path / "model.safetensors"))
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedRun(path, cfg, model, Encoding.of(encoder, tokenizer), user_index, vocab)
