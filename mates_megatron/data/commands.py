"""The `prepare` subcommand of `mates-megatron`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mates_megatron.data.prepare import PrepareConfig, PrepareError, prepare_corpus
from mates_megatron.data.tokenizer import default_tokenizer_path


def add_prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="JSONL -> Megatron indexed dataset + WebDataset shards (or build the embedded default data)",
        description=(
            'Tokenise a JSONL corpus ({"text": ..., "domain": optional} per line) with a local tokenizer into '
            "PREFIX.bin/.idx (megatron-core IndexedDataset) and PREFIX-shards/*.tar (WebDataset, with manifest). "
            "With --embedded, first gather the embedded default corpus into --out and prepare it to OUT/train."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="your JSONL corpus")
    src.add_argument("--embedded", action="store_true", help="build the embedded default corpus")
    p.add_argument("--output-prefix", type=Path, help="output prefix (with --input)")
    p.add_argument(
        "--out", type=Path, default=Path("data/embedded"), help="output directory (with --embedded)"
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help=f"local tokenizer directory (default {default_tokenizer_path()})",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234, help="seed of the embedded corpus")
    p.add_argument(
        "--max-docs-per-domain", type=int, default=6000, help="cap per domain of the embedded corpus"
    )
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    tokenizer = args.tokenizer or default_tokenizer_path()
    try:
        if args.embedded:
            from mates_megatron.data.embedded import EmbeddedCorpusConfig, build_embedded_corpus

            built = build_embedded_corpus(
                EmbeddedCorpusConfig(seed=args.seed, max_docs_per_domain=args.max_docs_per_domain), args.out
            )
            src, prefix = built["corpus"], args.out / "train"
            print(f"reference set: {built['reference']} ({built['reference_examples']} examples)")
        else:
            if args.output_prefix is None:
                print("error: --input needs --output-prefix (e.g. data/mine/train)", file=sys.stderr)
                return 2
            src, prefix = args.input, args.output_prefix
        out = prepare_corpus(
            PrepareConfig(
                input=src, output_prefix=prefix, tokenizer=tokenizer, samples_per_shard=args.samples_per_shard
            )
        )
    except (PrepareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out.num_docs} documents, {out.num_tokens} tokens -> {out.prefix}.bin/.idx and {out.shards_dir}/")
    for name, n in out.docs_per_domain.items():
        print(f"  {name:14s} {n:7d} docs")
    return 0
