"""Run configuration: typed, frozen dataclasses, saved resolved as `config.json` in every run.

`--set key=value` overrides any field by its dotted path, e.g. `--set rmbert.steps=2`,
`--set train.lr=2e-5`, `--set encoder.top_k=2`. Values are parsed by the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmbert.encoders.bert import EncoderConfig
from rmbert.models.dcn import DCNConfig
from rmbert.models.deepfm import DeepFMConfig
from rmbert.models.dkn import DKNConfig
from rmbert.models.features import FeatureConfig
from rmbert.models.fim import FIMConfig
from rmbert.models.lstur import LSTURConfig
from rmbert.models.naml import NAMLConfig
from rmbert.models.npa import NPAConfig
from rmbert.models.nrms import NRMSConfig
from rmbert.models.rmbert import RMBERTConfig

MODEL_NAMES = ("rmbert", "nrms", "lstur", "npa", "deepfm", "dcn", "dkn", "fim", "naml")


def require_at_least(cfg: Any, section: str, low: float, names: tuple[str, ...]) -> None:
    """Config validation: each named field of `cfg` is at least `low`, or a ValueError names it."""
    for name in names:
        if getattr(cfg, name) < low:
            raise ValueError(f"{section}.{name} must be >= {low}, not {getattr(cfg, name)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 50  # impressions (or click groups, with negatives) per step
    lr: float = 1e-3  # the recommender's learning rate (Adam)
    encoder_lr: float = 2e-5  # the news encoder's, in top-k and full modes (the paper's 2e-5)
    weight_decay: float = 0.0
    negatives: int = 0  # K sampled negatives per click; 0 = every candidate, pointwise (the paper)
    bucket: bool = True  # batches of impressions with similar candidate counts (less padding)
    accumulate: int = 1  # micro-batches per step (gradient accumulation): same gradient, less memory
    loss: str = "bce"  # bce (pointwise, the paper) | softmax (over click + K negatives)
    schedule: str = "constant"  # learning rate: constant (the paper) | linear (decay to 0 at the last epoch)
    warmup: float = 0.0  # share of all steps with a linear warm-up from 0
    max_history: int = 50  # M: the most recent clicks kept
    valid_fraction: float = 0.1  # used when no --valid split is given
    valid_by: str = "random"  # random impressions (the paper's protocol) | time: the latest ones, as MIND's dev follows train
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    checkpoint_every: int = 500  # steps between resumable checkpoints (0 = epoch ends only)
    log_every: int = 20
    grad_clip: float = 5.0
    eval_batch_size: int = 64
    amp: str = "auto"  # auto (bf16 on CUDA) | off | bf16 | fp16 (with a gradient scaler)
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        names = ("epochs", "batch_size", "max_history", "patience", "log_every", "eval_batch_size")
        require_at_least(self, "train", 1, (*names, "accumulate"))
        require_at_least(self, "train", 0, ("negatives", "max_steps", "checkpoint_every"))
        for name in ("lr", "encoder_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"train.{name} must be a positive number, not {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"train.{name} must be a number >= 0, not {getattr(self, name)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"train.valid_fraction must be between 0 and 1, not {self.valid_fraction}")
        if self.valid_by not in ("random", "time"):
            raise ValueError(f"train.valid_by must be random or time, not {self.valid_by!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"train.amp must be auto, off, bf16 or fp16, not {self.amp!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train.device must be auto, cpu or cuda[:n], not {self.device!r}")
        if self.loss not in ("bce", "softmax"):
            raise ValueError(f"train.loss must be bce or softmax, not {self.loss!r}")
        if self.loss == "softmax" and self.negatives < 1:
            raise ValueError("train.loss=softmax needs train.negatives >= 1")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"train.schedule must be constant or linear, not {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"train.warmup must be in [0, 1), not {self.warmup}")

    def lr_factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at optimizer step `step` (0-based) of `total`."""
        f = 1.0
        warm = int(self.warmup * total)
        if warm and step < warm:
            f = (step + 1) / warm
        if self.schedule == "linear" and total > 0:
            f *= max(0.0, 1.0 - step / total)
        return f


@dataclass(frozen=True)
class RunConfig:
    model: str = "rmbert"  # rmbert | nrms | lstur | npa | deepfm | dcn | dkn | fim | naml (its section below)
    # The run-level defaults are the best RMBERT measured (docs/results/quality.md): mean-pooled,
    # standardised news vectors; category, subcategory and entity embeddings (with MIND's entity
    # vectors where the data has them, initialised at std 0.5 against the standardised vectors'
    # 1) and recency embeddings of clicked news; a click layer fed by inputs of low capacity: the
    # learned-metric similarity (eq. 8''', 4 metric heads), the exact and graded overlaps with the
    # clicked news (eq. 8'''', 8'''''), the learned category/subcategory relations and priors (eq.
    # 8f) and the memory's match to the candidate (eq. 8m), in place of eq. 8's D-dim
    # [x_n ; m_p] (click_concat=false), which fits the training news and carries over worse. The
    # model dataclasses themselves default to the paper's form, so a config.json saved before a
    # switch existed still loads as it was trained; `--preset paper` switches every addition off.
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(pooling="mean", standardize=True))
    features: FeatureConfig = field(
        default_factory=lambda: FeatureConfig(
            category=True,
            subcategory=True,
            entities=True,
            entity_vectors=True,
            history_position=True,
            init_std=0.5,
        )
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    rmbert: RMBERTConfig = field(
        default_factory=lambda: RMBERTConfig(
            click_concat=False,
            similarity=True,
            similarity_heads=4,
            feature_match=True,
            content_match=True,
            field_affinity=True,
            memory_match=True,
        )
    )
    nrms: NRMSConfig = field(default_factory=NRMSConfig)
    lstur: LSTURConfig = field(default_factory=LSTURConfig)
    npa: NPAConfig = field(default_factory=NPAConfig)
    deepfm: DeepFMConfig = field(default_factory=DeepFMConfig)
    dcn: DCNConfig = field(default_factory=DCNConfig)
    dkn: DKNConfig = field(default_factory=DKNConfig)
    fim: FIMConfig = field(default_factory=FIMConfig)
    naml: NAMLConfig = field(default_factory=NAMLConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, values: dict[str, Any]) -> RunConfig:
        """A copy with fields set by dotted path, e.g. cfg.override({"train.epochs": 3})."""
        cfg = self
        for key, value in values.items():
            cfg = _set_value(cfg, key.split("."), value, key)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """A run written down as YAML over the same dataclasses (any subset of fields)."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError("not a mapping of settings")
            return from_dict(cls, _merge(RunConfig().to_dict(), data))
        except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, not {self.model!r}")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """A saved config.json; any problem is a ValueError naming the file and the field. A
        section the file lacks (saved before it existed) takes its dataclass's own defaults, the
        paper's form, not the run-level defaults: an old run loads as it was trained."""
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            hints = _hints(cls)
            sections = {
                f.name: {} for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
            }
            return from_dict(cls, {**sections, **data})
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# Presets are code: named sets of overrides on the defaults. `paper` is the paper's exact model
# and training objective (RMBERT eq. 1-8 over h[CLS] of titles only, pointwise BCE over every
# candidate, constant learning rate, batches of 50); the defaults add what `benchmarks/quality.py`
# showed to help across generators and scales (see docs/results/quality.md).
PRESETS: dict[str, list[str]] = {
    "default": [],
    "paper": [
        "encoder.pooling=cls",
        "encoder.standardize=false",
        "features.category=false",
        "features.subcategory=false",
        "features.entity_vectors=false",
        "features.entities=false",
        "rmbert.click_product=false",
        "rmbert.click_concat=true",
        "rmbert.match_strength=false",
        "rmbert.similarity=false",
        "rmbert.similarity_heads=1",
        "rmbert.feature_match=false",
        "rmbert.content_match=false",
        "rmbert.field_affinity=false",
        "rmbert.memory_match=false",
        "rmbert.wide=false",
        "features.init_std=0.1",
        "rmbert.query_attention=softmax",
        "train.loss=bce",
        "train.negatives=0",
        "train.schedule=constant",
        "train.warmup=0",
        "train.batch_size=50",
        "features.history_position=false",
    ],
}


def preset(name: str, base: RunConfig | None = None) -> RunConfig:
    """The named preset applied to `base` (default: the defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(base or RunConfig(), PRESETS[name])


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(where: str, t: Any, value: Any) -> None:
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ValueError(f"{where} must be {t.__name__}, not {value!r}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys and values of the wrong type."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        t, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be an object of settings, not {value!r}")
            kwargs[name] = from_dict(t, value, key + ".")
        else:
            _check_type(key, t, value)
            kwargs[name] = float(value) if t is float else value
    return cls(**kwargs)


def _parse(t: Any, text: str) -> Any:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(t)):
            return None
        return _parse(args[0], text)
    if t is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if t in (int, float, str):
        return t(text)
    raise ValueError(f"cannot set a field of type {t}")


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b=value` overrides to a frozen dataclass tree; errors name the key."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), text.strip(), key)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _set_value(obj: Any, path: list[str], value: Any, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"{key}: {type(obj).__name__} has no field {path[0]!r}")
    if len(path) > 1:
        return dataclasses.replace(obj, **{path[0]: _set_value(getattr(obj, path[0]), path[1:], value, key)})
    _check_type(key, _hints(type(obj))[path[0]], value)
    return dataclasses.replace(obj, **{path[0]: value})


def _set(obj: Any, path: list[str], text: str, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(
            f"--set {key}: {type(obj).__name__} has no field {path[0]!r} (fields: {', '.join(sorted(names))})"
        )
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: {path[0]!r} is not a group of settings")
        return dataclasses.replace(obj, **{path[0]: _set(current, path[1:], text, key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {key}: {path[0]!r} is a group; set one of its fields")
    try:
        value = _parse(_hints(type(obj))[path[0]], text)
    except ValueError as e:
        raise ValueError(f"--set {key}: {e}") from None
    return dataclasses.replace(obj, **{path[0]: value})
