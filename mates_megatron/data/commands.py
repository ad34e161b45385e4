"""The `prepare` subcommand of `mates-megatron`: argparse in, typed configs out (the edge)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mates_megatron.data.prepare import PrepareConfig, PreparedCorpus, PrepareError, prepare_corpus
from mates_megatron.data.tokenizer import default_tokenizer_path

DEFAULT_EMBEDDED_OUT = Path("data/embedded")


def add_prepare_parser(subparsers) -> None:
    """Add `prepare` to the `mates-megatron` subcommands; its ``func`` is ``run_prepare``."""
    p = subparsers.add_parser(
        "prepare",
        help="JSONL -> Megatron indexed dataset + WebDataset shards (or build the embedded default data)",
        description=(
            'Tokenise a JSONL corpus ({"text": ..., "domain": optional} per line) with a local tokenizer into '
            "PREFIX.bin/.idx (megatron-core IndexedDataset), PREFIX.domains.npy, PREFIX.meta.json and "
            "PREFIX-shards/shard-*.tar (WebDataset, with manifest.json). With --embedded, first gather the "
            "embedded default corpus (stdlib docstrings and code, license texts, package READMEs, junk), the "
            "LAMBADA-style probe reference (reference.jsonl) and held-out evaluation sets from other source files "
            "(eval_lambada.jsonl, heldout.jsonl) from this machine's files into --out, then prepare the corpus "
            "to OUT/train."
        ),
        epilog=(
            "examples:\n"
            "  mates-megatron prepare --input corpus.jsonl --output-prefix data/mydata/train\n"
            "  mates-megatron prepare --embedded --out data/embedded"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="your JSONL corpus (needs --output-prefix)")
    src.add_argument("--embedded", action="store_true", help="build and prepare the embedded default corpus")
    p.add_argument("--output-prefix", type=Path, help="output prefix with --input, e.g. data/mydata/train")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory with --embedded (default {DEFAULT_EMBEDDED_OUT})",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help=f"local tokenizer directory (default {default_tokenizer_path()})",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="documents per tar shard")
    p.add_argument("--seed", type=int, default=None, help="seed of the embedded corpus (default 1234)")
    p.add_argument(
        "--max-docs-per-domain",
        type=int,
        default=None,
        help="cap per domain of the embedded corpus (default 6000)",
    )
    p.set_defaults(func=run_prepare)


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.embedded:
        if args.output_prefix is not None:
            return "--output-prefix goes with --input; with --embedded use --out DIR (writes DIR/train.*)"
    else:
        if args.output_prefix is None:
            return "--input needs --output-prefix (e.g. data/mydata/train)"
        for flag, value in (("--out", args.out), ("--seed", args.seed), ("--max-docs-per-domain", args.max_docs_per_domain)):  # fmt: skip
            if value is not None:
                return f"{flag} goes with --embedded; with --input use --output-prefix"
    return None


def run_prepare(args: argparse.Namespace) -> int:
    """Run `prepare`; returns the exit code (2 with `error: ...` on stderr for bad input)."""
    from mates_megatron.data.embedded import EmbeddedCorpusConfig, EmbeddedCorpusError, build_embedded_corpus

    usage = _usage_error(args)
    if usage:
        print(f"error: {usage}", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer or default_tokenizer_path()
    try:
        # Validate every option before the (slow) gathering starts: the configs name the bad field.
        embedded_cfg = None
        if args.embedded:
            out_dir = args.out or DEFAULT_EMBEDDED_OUT
            given = {"seed": args.seed, "max_docs_per_domain": args.max_docs_per_domain}
            embedded_cfg = EmbeddedCorpusConfig(**{k: v for k, v in given.items() if v is not None})
            src, prefix = out_dir / "corpus.jsonl", out_dir / "train"
        else:
            src, prefix = args.input, args.output_prefix
        prepare_cfg = PrepareConfig(
            input=src, output_prefix=prefix, tokenizer=tokenizer, samples_per_shard=args.samples_per_shard
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        built = build_embedded_corpus(embedded_cfg, out_dir) if embedded_cfg is not None else None
        prepared = prepare_corpus(prepare_cfg)
    except (PrepareError, EmbeddedCorpusError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(prepared, built)
    return 0


def _print_summary(prepared: PreparedCorpus, built: dict | None) -> None:
    print(f"{prepared.num_docs} documents, {prepared.num_tokens} tokens (eod included)")
    print(f"  {'domain':14s} {'docs':>8s} {'tokens':>11s}")
    for name in prepared.domains:
        print(f"  {name:14s} {prepared.docs_per_domain[name]:8d} {prepared.tokens_per_domain[name]:11d}")
    print(f"indexed dataset: {prepared.prefix}.bin / .idx  (+ .domains.npy, .meta.json)")
    print(
        f"webdataset:      {prepared.shards_dir}/ ({len(list(prepared.shards_dir.glob('shard-*.tar')))} shards)"
    )
    if built is not None:
        print(f"corpus:          {built['corpus']}")
        print(f"reference set:   {built['reference']} ({built['reference_examples']} examples)")
        print(f"eval set:        {built['eval_lambada']} ({built['eval_examples']} examples)")
        held = built["heldout_docs_per_domain"]
        per_domain = ", ".join(f"{name} {n}" for name, n in held.items())
        print(f"held-out docs:   {built['heldout']} ({sum(held.values())} documents: {per_domain})")
