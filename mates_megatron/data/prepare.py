"""`mates-megatron prepare`: JSONL -> Megatron indexed dataset (.bin/.idx) and WebDataset tar shards.

Outputs for ``--output-prefix P``:
    P.bin, P.idx          megatron.core.datasets IndexedDataset, one document per JSONL line (+ eod)
    P.domains.npy         int16 domain index per document
    P.meta.json           tokenizer, vocab size, eod id, domains, counts
    P-shards/shard-NNNNNN.tar + manifest.json   WebDataset: KEY.txt, KEY.json {"id", "domain"}, KEY.ids.npy
Document i of the indexed dataset is the sample with id i in the shards. Everything is written under
temporary names and renamed at the end: a failed prepare leaves no half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mates_megatron.data.tokenizer import default_tokenizer_path, eod_token_id, load_tokenizer


class PrepareError(ValueError):
    """Bad prepare input; the message names the file, the line and the fix."""


@dataclass
class PrepareConfig:
    """One prepare job."""

    input: Path
    """JSONL file: one {"text": ..., "domain": optional} object per line."""
    output_prefix: Path
    """Output prefix P (P.bin, P.idx, P.meta.json, P.domains.npy, P-shards/)."""
    tokenizer: Path = field(default_factory=default_tokenizer_path)
    """Local tokenizer directory."""
    samples_per_shard: int = 1000
    """Documents per WebDataset tar shard."""
    append_eod: bool = True
    """Append the tokenizer's end-of-document id to every document."""
    batch_size: int = 256
    """Documents tokenised per call."""

    def __post_init__(self) -> None:
        self.input, self.output_prefix, self.tokenizer = (
            Path(self.input),
            Path(self.output_prefix),
            Path(self.tokenizer),
        )
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ValueError("PrepareConfig.samples_per_shard and batch_size must be >= 1")


@dataclass
class PreparedCorpus:
    prefix: Path
    shards_dir: Path
    num_docs: int
    num_tokens: int
    domains: list[str]
    docs_per_domain: dict[str, int]


_FIX = 'each line must be a JSON object like {"text": "...", "domain": "optional"}'


def read_jsonl(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, text, domain); raise PrepareError naming the line for any bad line."""
    if not path.is_file():
        raise PrepareError(f"{path}: no such file; pass --input a JSONL file")
    any_line = False
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            any_line = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"{path} line {lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                ) from e
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path} line {lineno}: invalid JSON ({e.msg}); {_FIX}") from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise PrepareError(f'{path} line {lineno}: no "text" field; {_FIX}')
            text, domain = obj["text"], obj.get("domain", "default")
            if not isinstance(text, str):
                raise PrepareError(
                    f'{path} line {lineno}: "text" is {type(text).__name__}, not a string; {_FIX}'
                )
            if not text.strip():
                raise PrepareError(f'{path} line {lineno}: "text" is empty; drop the line or fill it')
            if not isinstance(domain, str):
                raise PrepareError(f'{path} line {lineno}: "domain" must be a string; {_FIX}')
            yield lineno, text, domain
    if not any_line:
        raise PrepareError(f"{path} is empty: it needs at least one JSONL line; {_FIX}")


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def prepare_corpus(cfg: PrepareConfig) -> PreparedCorpus:
    import webdataset as wds
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from mates_megatron.pool.manifest import write_manifest

    total_lines = _count_lines(cfg.input) if cfg.input.is_file() else None
    tok = load_tokenizer(cfg.tokenizer)
    eod = eod_token_id(tok)
    vocab = len(tok)
    dtype = DType.optimal_dtype(vocab)
    prefix = cfg.output_prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.parent / f".tmp-prepare-{prefix.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        builder = IndexedDatasetBuilder(str(tmp / "data.bin"), dtype=dtype)
        shards_tmp = tmp / "shards"
        shards_tmp.mkdir()
        domains: dict[str, int] = {}
        doc_domain: list[int] = []
        shards: list[dict] = []
        writer = None
        num_docs = num_tokens = 0

        def flush(batch: list[tuple[int, str, str]]) -> None:
            nonlocal writer, num_docs, num_tokens
            ids_list = tok([t for _, t, _ in batch], add_special_tokens=False)["input_ids"]
            for (_, text, domain), ids in zip(batch, ids_list, strict=True):
                if cfg.append_eod:
                    ids = [*ids, eod]
                arr = np.asarray(ids, dtype=np.int32)
                builder.add_document(arr.astype(dtype), [len(arr)])
                d = domains.setdefault(domain, len(domains))
                doc_domain.append(d)
                if num_docs % cfg.samples_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    name = f"shard-{len(shards):06d}.tar"
                    shards.append({"name": name, "num_samples": 0, "first_id": num_docs})
                    writer = wds.TarWriter(str(shards_tmp / name))
                writer.write(
                    {
                        "__key__": f"{num_docs:010d}",
                        "txt": text,
                        "json": {"id": num_docs, "domain": domain},
                        "ids.npy": arr,
                    }
                )
                shards[-1]["num_samples"] += 1
                num_docs += 1
                num_tokens += len(arr)

        batch: list[tuple[int, str, str]] = []
        for item in tqdm(
            read_jsonl(cfg.input), total=total_lines, desc=f"prepare {cfg.input.name}", unit="doc"
        ):
            batch.append(item)
            if len(batch) >= cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if writer is not None:
            writer.close()
        builder.finalize(str(tmp / "data.idx"))
        np.save(tmp / "domains.npy", np.asarray(doc_domain, dtype=np.int16))
        write_manifest(shards_tmp, shards)
        names = sorted(domains, key=domains.get)
        counts = Counter(doc_domain)
        meta = {
            "format": 1,
            "tokenizer": str(cfg.tokenizer),
            "vocab_size": vocab,
            "eod_id": eod,
            "dtype": np.dtype(dtype).name,
            "num_docs": num_docs,
            "num_tokens": num_tokens,
            "domains": names,
            "docs_per_domain": {n: counts[i] for i, n in enumerate(names)},
            "source": str(cfg.input),
            "shards": shards,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # Publish: shards dir first, then the files that readers look for.
        shards_dir = Path(f"{prefix}-shards")
        shutil.rmtree(shards_dir, ignore_errors=True)
        os.replace(shards_tmp, shards_dir)
        for src, dst in (
            ("domains.npy", ".domains.npy"),
            ("data.idx", ".idx"),
            ("data.bin", ".bin"),
            ("meta.json", ".meta.json"),
        ):
            os.replace(tmp / src, f"{prefix}{dst}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedCorpus(
        prefix=prefix, shards_dir=shards_dir, num_docs=num_docs, num_tokens=num_tokens,
        domains=names, docs_per_domain=meta["docs_per_domain"],
    )  # fmt: skip
