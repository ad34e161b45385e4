"""The `prepare` subcommand of `mates-megatron`: argparse in, typed configs out (the edge)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mates_megatron.data.prepare import PrepareConfig, PreparedCorpus, PrepareError, prepare_corpus
from mates_megatron.data.tokenizer import default_tokenizer_path


def add_prepare_parser(subparsers) -> None:
    """Add `prepare` to the `mates-megatron` subcommands; its ``func`` is ``run_prepare``."""
    p = subparsers.add_parser(
        "prepare",
        help="JSONL -> Megatron indexed dataset + WebDataset shards",
        description=(
            'Tokenise a JSONL corpus ({"text": ..., "domain": optional} per line) with a local tokenizer into '
            "PREFIX.bin/.idx (megatron-core IndexedDataset), PREFIX.domains.npy, PREFIX.meta.json and "
            "PREFIX-shards/shard-*.tar (WebDataset, with manifest.json). The demo's embedded corpus is built by "
            "`mates-lab embedded` (the lab)."
        ),
        epilog=("examples:\n  mates-megatron prepare --input corpus.jsonl --output-prefix data/mydata/train"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", type=Path, required=True, help="your JSONL corpus")
    p.add_argument("--output-prefix", type=Path, required=True, help="output prefix, e.g. data/mydata/train")
    add_prepare_options(p)
    p.set_defaults(func=run_prepare)


def add_prepare_options(p: argparse.ArgumentParser) -> None:
    """The options of the prepare step (``--tokenizer``, ``--samples-per-shard``), shared by the commands
    that end in it (`prepare`, the lab's `embedded`)."""
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help=f"local tokenizer directory (default {default_tokenizer_path()})",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="documents per tar shard")


def run_prepare(args: argparse.Namespace) -> int:
    """Run `prepare`; returns the exit code (2 with `error: ...` on stderr for bad input)."""
    try:
        cfg = PrepareConfig(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer or default_tokenizer_path(),
            samples_per_shard=args.samples_per_shard,
        )
        prepared = prepare_corpus(cfg)
    except (ValueError, PrepareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(prepared)
    return 0


def print_summary(prepared: PreparedCorpus) -> None:
    """What `prepare` wrote: documents and tokens per domain, and the two formats' paths."""
    print(f"{prepared.num_docs} documents, {prepared.num_tokens} tokens (eod included)")
    print(f"  {'domain':14s} {'docs':>8s} {'tokens':>11s}")
    for name in prepared.domains:
        print(f"  {name:14s} {prepared.docs_per_domain[name]:8d} {prepared.tokens_per_domain[name]:11d}")
    print(f"indexed dataset: {prepared.prefix}.bin / .idx  (+ .domains.npy, .meta.json)")
    print(
        f"webdataset:      {prepared.shards_dir}/ ({len(list(prepared.shards_dir.glob('shard-*.tar')))} shards)"
    )
