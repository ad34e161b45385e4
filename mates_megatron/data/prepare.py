"""`mates-megatron prepare`: JSONL -> Megatron indexed dataset (.bin/.idx) and WebDataset tar shards.

Outputs for ``output_prefix P``:
    P.bin, P.idx          megatron.core.datasets IndexedDataset, one document per JSONL line (+ eod)
    P.domains.npy         int16 domain index per document (names in P.meta.json "domains")
    P.meta.json           tokenizer, vocab size, eod id, dtype, counts, domains, shards
    P-shards/shard-NNNNNN.tar + manifest.json   WebDataset: KEY.txt, KEY.json {"id", "domain"}, KEY.ids.npy
Document i of the indexed dataset is the sample with id i (key f"{i:010d}") in the shards. Everything is
written under a temporary directory and renamed at the end: a failed prepare leaves no half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mates_megatron.data.tokenizer import default_tokenizer_path, eod_token_id, load_tokenizer
from mates_megatron.progress import progress as progress_bar

META_FORMAT = 1
_MAX_DOMAINS = int(np.iinfo(np.int16).max) + 1


class PrepareError(ValueError):
    """Bad prepare input; the message names the file, the line and the fix."""


@dataclass
class PrepareConfig:
    """One prepare job: a JSONL corpus -> indexed dataset + WebDataset shards."""

    input: Path
    """JSONL file: one {"text": str, "domain": str (optional, default "default")} object per line."""
    output_prefix: Path
    """Output prefix P: writes P.bin, P.idx, P.meta.json, P.domains.npy and the directory P-shards/."""
    tokenizer: Path = field(default_factory=default_tokenizer_path)
    """Local tokenizer directory (never downloaded); default: the all-MiniLM-L6-v2 BERT tokenizer."""
    samples_per_shard: int = 1000
    """Documents per WebDataset tar shard."""
    append_eod: bool = True
    """Append the tokenizer's end-of-document id (eos, else [SEP]) to every document."""
    batch_size: int = 256
    """Documents tokenised per tokenizer call."""

    def __post_init__(self) -> None:
        self.input = Path(self.input)
        self.output_prefix = Path(self.output_prefix)
        self.tokenizer = Path(self.tokenizer)
        if self.samples_per_shard < 1:
            raise ValueError(f"PrepareConfig.samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"PrepareConfig.batch_size={self.batch_size}: must be >= 1")
        if self.output_prefix.name in ("", ".", ".."):
            raise ValueError(
                f"PrepareConfig.output_prefix={str(self.output_prefix)!r}: give a file prefix such as "
                "data/mine/train (outputs are train.bin, train.idx, train-shards/ ...)"
            )


@dataclass
class PreparedCorpus:
    """What ``prepare_corpus`` wrote."""

    prefix: Path
    """The prefix: IndexedDataset(str(prefix)) reads it."""
    shards_dir: Path
    """The WebDataset shard directory ({prefix}-shards) with manifest.json."""
    num_docs: int
    num_tokens: int
    """Tokens written, eod included."""
    domains: list[str]
    """Domain names in index order (the values of {prefix}.domains.npy index this list)."""
    docs_per_domain: dict[str, int]
    tokens_per_domain: dict[str, int]
    meta_path: Path


_FIX = 'each line must be a JSON object like {"text": "...", "domain": "optional"}'


def read_jsonl(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (1-based line number, text, domain) for each non-blank line of a JSONL corpus.

    Raises PrepareError naming the file, the line and the fix for: a missing file, no non-blank line,
    bytes that are not UTF-8, invalid JSON, a line that is not an object with a non-empty string "text",
    and a "domain" that is not a string.
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: no such file; pass --input a JSONL file")
    any_line = False
    # Binary, decoded per line, so that a bad byte is reported with its line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            any_line = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"{path} line {lineno}: not valid UTF-8 (byte {e.start} of the line); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from e
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(
                    f"{path} line {lineno}: invalid JSON ({e.msg}, column {e.colno}); {_FIX}"
                ) from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise PrepareError(f'{path} line {lineno}: no "text" field; {_FIX}')
            text, domain = obj["text"], obj.get("domain", "default")
            if not isinstance(text, str):
                raise PrepareError(
                    f'{path} line {lineno}: "text" is {type(text).__name__}, not a string; {_FIX}'
                )
            if not text.strip():
                raise PrepareError(
                    f'{path} line {lineno}: "text" is empty; drop the line or give it some text'
                )
            if not isinstance(domain, str) or not domain:
                raise PrepareError(
                    f'{path} line {lineno}: "domain" must be a non-empty string (or left out); {_FIX}'
                )
            yield lineno, text, domain
    if not any_line:
        raise PrepareError(f"{path} is empty (no non-blank line): it needs at least one JSONL line; {_FIX}")


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _index_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets import indexed_dataset

    dtype_enum = indexed_dataset.DType
    if hasattr(dtype_enum, "optimal_dtype"):
        return dtype_enum.optimal_dtype(vocab_size)
    return np.uint16 if vocab_size < 65500 else np.int32


def prepare_corpus(cfg: PrepareConfig) -> PreparedCorpus:
    """Tokenise ``cfg.input`` and write the indexed dataset, domains, meta and shards (see module doc).

    Raises PrepareError for bad input (nothing is written then) and FileNotFoundError for a missing
    tokenizer.
    """
    import webdataset as wds
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mates_megatron.pool.manifest import write_manifest

    if not cfg.input.is_file():
        raise PrepareError(f"{cfg.input}: no such file; pass --input a JSONL file")
    total_lines = _count_lines(cfg.input)
    tok = load_tokenizer(cfg.tokenizer)
    eod = eod_token_id(tok)
    vocab = len(tok)  # includes added tokens, which tok.vocab_size leaves out
    dtype = _index_dtype(vocab)
    prefix = cfg.output_prefix
    created = [p for p in [prefix.parent, *prefix.parent.parents] if not p.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.parent / f".tmp-prepare-{prefix.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ok = False
    builder = writer = None
    try:
        builder = IndexedDatasetBuilder(str(tmp / "data.bin"), dtype=dtype)
        shards_tmp = tmp / "shards"
        shards_tmp.mkdir()
        domain_ids: dict[str, int] = {}
        doc_domain: list[int] = []
        doc_tokens: list[int] = []
        shards: list[dict] = []

        def flush(batch: list[tuple[int, str, str]]) -> None:
            nonlocal writer
            ids_list = tok([t for _, t, _ in batch], add_special_tokens=False)["input_ids"]
            for (lineno, text, domain), ids in zip(batch, ids_list, strict=True):
                arr = np.asarray([*ids, eod] if cfg.append_eod else ids, dtype=np.int32)
                doc_id = len(doc_domain)
                if domain not in domain_ids and len(domain_ids) == _MAX_DOMAINS:
                    raise PrepareError(
                        f"{cfg.input} line {lineno}: more than {_MAX_DOMAINS} distinct domains (stored as "
                        'int16); "domain" is meant for a few source names such as "web" or "code"'
                    )
                builder.add_document(arr, [len(arr)])  # one sequence per document
                doc_domain.append(domain_ids.setdefault(domain, len(domain_ids)))
                doc_tokens.append(len(arr))
                if doc_id % cfg.samples_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    name = f"shard-{len(shards):06d}.tar"
                    shards.append({"name": name, "num_samples": 0, "first_id": doc_id})
                    writer = wds.TarWriter(str(shards_tmp / name))
                writer.write(
                    {
                        "__key__": f"{doc_id:010d}",
                        "txt": text,
                        "json": {"id": doc_id, "domain": domain},
                        "ids.npy": arr,
                    }
                )
                shards[-1]["num_samples"] += 1

        batch: list[tuple[int, str, str]] = []
        for item in progress_bar(
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
            writer = None
        builder.finalize(str(tmp / "data.idx"))
        domains_arr = np.asarray(doc_domain, dtype=np.int16)
        np.save(tmp / "domains.npy", domains_arr)
        write_manifest(shards_tmp, shards)

        names = sorted(domain_ids, key=domain_ids.__getitem__)
        docs_per_domain = dict.fromkeys(names, 0)
        tokens_per_domain = dict.fromkeys(names, 0)
        for d, n in zip(doc_domain, doc_tokens, strict=True):
            docs_per_domain[names[d]] += 1
            tokens_per_domain[names[d]] += n
        num_docs, num_tokens = len(doc_tokens), int(sum(doc_tokens))
        meta = {
            "format": META_FORMAT,
            "tokenizer": str(cfg.tokenizer),
            "vocab_size": vocab,
            "eod_id": eod,
            "append_eod": cfg.append_eod,
            "dtype": np.dtype(dtype).name,
            "num_docs": num_docs,
            "num_tokens": num_tokens,
            "domains": names,
            "docs_per_domain": docs_per_domain,
            "tokens_per_domain": tokens_per_domain,
            "source": str(cfg.input),
            "shards": shards,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        # Publish: the shards directory first, the meta file (what readers look for first) last.
        shards_dir = Path(f"{prefix}-shards")
        shutil.rmtree(shards_dir, ignore_errors=True)
        os.replace(shards_tmp, shards_dir)
        published = (
            ("domains.npy", ".domains.npy"),
            ("data.idx", ".idx"),
            ("data.bin", ".bin"),
            ("meta.json", ".meta.json"),
        )
        for src, suffix in published:
            os.replace(tmp / src, f"{prefix}{suffix}")
        ok = True
    finally:
        if not ok:  # close what is open before deleting it
            if writer is not None:
                writer.close()
            if builder is not None:
                builder.data_file.close()  # IndexedDatasetBuilder has no close(); finalize() writes the .idx
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:  # leave no empty directories that this call created
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
    return PreparedCorpus(
        prefix=prefix,
        shards_dir=shards_dir,
        num_docs=num_docs,
        num_tokens=num_tokens,
        domains=names,
        docs_per_domain=docs_per_domain,
        tokens_per_domain=tokens_per_domain,
        meta_path=Path(f"{prefix}.meta.json"),
    )
