"""Reference set: LAMBADA-style (context, target) examples whose loss counts the target tokens only.

Accepted JSONL lines: ``{"context": ..., "target": ...}`` (loss on the target tokens) or ``{"text": ...}``
(loss on every token). Each example becomes one fixed-length row, so that pipeline stages see one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mates_megatron.runtime.schedule import Batch


@dataclass(frozen=True)
class ReferenceSet:
    """Tokenised reference examples as fixed-length rows of seq_length + 1 tokens."""

    tokens: np.ndarray
    """[n, seq_length + 1] int64 token ids (right-padded with pad_id)."""
    loss_mask: np.ndarray
    """[n, seq_length] float32: 1 where the label (token i+1) is a counted token."""
    path: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1] - 1)

    def with_all_tokens(self) -> ReferenceSet:
        """The same examples with every real label counted: context and target (a language-modelling loss)."""
        mask = np.zeros_like(self.loss_mask)
        for i, row in enumerate(self.loss_mask):
            last = np.flatnonzero(row)
            if len(last):  # labels 0..last are the example's tokens; the rest is padding
                mask[i, : last[-1] + 1] = 1.0
        return ReferenceSet(tokens=self.tokens, loss_mask=mask, path=self.path)

    def trimmed(self, multiple: int = 8) -> ReferenceSet:
        """The same examples cut after the longest one's last counted label (rounded up to ``multiple``,
        at most seq_length): rows are right-padded and attention is causal, so the padding past every
        example's end changes no counted loss and only costs its FLOPs (LAMBADA rows are about a tenth of a
        2,048-token window). One width for the whole set keeps pipeline stages on one shape."""
        counted = np.flatnonzero(self.loss_mask.any(axis=0))
        width = int(counted[-1]) + 1 if len(counted) else 1
        width = min(self.seq_length, -(-width // multiple) * multiple)
        return ReferenceSet(self.tokens[:, : width + 1].copy(), self.loss_mask[:, :width].copy(), self.path)

    def micro_batches(self, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> list[Batch]:
        """This data-parallel rank's share (strided), padded so that every rank gets as many batches.

        Padding rows have an all-zero loss mask: they change no sum, and every rank runs the same number
        of forward passes (pipeline stages and collectives stay in step).
        """
        n = len(self)
        per_rank = -(-n // dp_size)
        n_batches = -(-per_rank // micro_batch_size)
        idx = np.arange(dp_rank, n, dp_size)
        rows = n_batches * micro_batch_size
        tokens = np.zeros((rows, self.tokens.shape[1]), dtype=np.int64)
        mask = np.zeros((rows, self.loss_mask.shape[1]), dtype=np.float32)
        tokens[: len(idx)] = self.tokens[idx]
        mask[: len(idx)] = self.loss_mask[idx]
        return [
            make_batch(tokens[i : i + micro_batch_size], mask[i : i + micro_batch_size])
            for i in range(0, rows, micro_batch_size)
        ]


def make_batch(tokens: np.ndarray, loss_mask: np.ndarray) -> Batch:
    t = torch.from_numpy(np.ascontiguousarray(tokens)).long()
    seq = t.shape[1] - 1
    return {
        "tokens": t[:, :-1].contiguous(),
        "labels": t[:, 1:].contiguous(),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask)).float(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(t.shape[0], -1).contiguous(),
    }


@dataclass(frozen=True)
class ReferenceFile:
    """A reference set by its JSONL file alone, untokenised: what the scorers that read the reference as text
    ('dsir', 'classifier', 'lava', 'gotd', 'lookalike') take of the host's ``ReferenceSet``, for use where
    there is no host (``mates-megatron value``, the lab's benchmarks)."""

    path: str
    """The JSONL file of {"context", "target"} or {"text"} lines."""


def reference_texts(reference: ReferenceSet | ReferenceFile | None, *, scorer: str) -> list[str]:
    """The reference examples as text (context + target, or text), read from ``reference.path``'s JSONL."""
    if reference is None:
        raise ValueError(f"scorer {scorer!r} fits toward a reference set: the host has none configured")
    texts = []
    for lineno, obj in read_jsonl(reference.path):
        if "context" in obj and "target" in obj:
            texts.append(obj["context"] + obj["target"])
        elif "text" in obj:
            texts.append(obj["text"])
        else:
            raise ValueError(
                f'{reference.path} line {lineno}: expected {{"context": ..., "target": ...}} or {{"text": ...}}'
            )
    if not texts:
        raise ValueError(f"reference set {reference.path} is empty: it needs at least one example")
    return texts


def require_jsonl(path: str | Path, what: str = "reference set") -> Path:
    """``path``, or FileNotFoundError naming ``what`` and the fix when it is no file (also checked by the
    launchers before torchrun: ``pretrain.check_run_files``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'{what} {path} not found: pass a JSONL of {{"context", "target"}} or {{"text"}} lines '
            "(`mates-lab embedded --out DIR` writes DIR/reference.jsonl)"
        )
    return path


def read_jsonl(path: str | Path, what: str = "reference set") -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a UTF-8 JSON object names itself."""
    path = require_jsonl(path, what)
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} line {lineno}: not a UTF-8 JSON object ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f'{path} line {lineno}: expected {{"context", "target"}} or {{"text"}}')
            out.append((lineno, obj))
    return out


def encode_examples(
    rows: list[tuple[int, dict]], path: str | Path, tokenizer, seq_length: int, *, pad_id: int = 0
) -> ReferenceSet:
    """Tokenise (line number, example) rows; contexts longer than the window are cut from the left."""
    tokens, masks = [], []
    for lineno, obj in rows:
        if "target" in obj and "context" in obj:
            ctx = tokenizer(obj["context"], add_special_tokens=False)["input_ids"]
            tgt = tokenizer(obj["target"], add_special_tokens=False)["input_ids"]
        elif "text" in obj:
            ctx, tgt = [], tokenizer(obj["text"], add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(
                f'{path} line {lineno}: expected {{"context": ..., "target": ...}} or {{"text": ...}}'
            )
        if not tgt:
            raise ValueError(f"{path} line {lineno}: the target tokenises to nothing")
        seq = (ctx + tgt)[-(seq_length + 1) :]
        n_tgt = min(len(tgt), len(seq) - 1)
        row = np.full(seq_length + 1, pad_id, dtype=np.int64)
        row[: len(seq)] = seq
        mask = np.zeros(seq_length, dtype=np.float32)
        # Label i is token i+1: the last n_tgt labels of the sequence are the target tokens.
        mask[len(seq) - 1 - n_tgt : len(seq) - 1] = 1.0
        tokens.append(row)
        masks.append(mask)
    if not tokens:
        raise ValueError(f"{path} is empty: it needs at least one example")
    return ReferenceSet(tokens=np.stack(tokens), loss_mask=np.stack(masks), path=str(path))


def load_reference_set(path: str | Path, tokenizer, seq_length: int, *, pad_id: int = 0) -> ReferenceSet:
    """Read and tokenise a reference JSONL. Contexts longer than the window are cut from the left."""
    return encode_examples(read_jsonl(path), path, tokenizer, seq_length, pad_id=pad_id)
