"""`mates-lab embedded`: build the demo's embedded corpus from this machine's files and prepare it (the edge)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mates_megatron.data.commands import add_prepare_options, print_summary
from mates_megatron.data.prepare import PrepareConfig, PrepareError, prepare_corpus
from mates_megatron.data.tokenizer import default_tokenizer_path

DEFAULT_EMBEDDED_OUT = Path("data/embedded")


def add_embedded_parser(subparsers) -> None:
    """Add `embedded` to the `mates-lab` subcommands; its ``func`` is ``run_embedded``."""
    p = subparsers.add_parser(
        "embedded",
        help="build and prepare the embedded default corpus (the demo's data)",
        description=(
            "Gather the embedded default corpus (stdlib docstrings and code, license texts, package READMEs, "
            "junk), the LAMBADA-style probe reference (reference.jsonl) and held-out evaluation sets from other "
            "source files (eval_lambada.jsonl, heldout.jsonl) from this machine's files into --out, then prepare "
            "the corpus to OUT/train as `mates-megatron prepare` does."
        ),
        epilog="example:\n  mates-lab embedded --out data/embedded",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_EMBEDDED_OUT, help="output directory (default %(default)s)"
    )
    add_prepare_options(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the embedded corpus (default 1234)")
    p.add_argument(
        "--max-docs-per-domain",
        type=int,
        default=None,
        help="cap per domain of the embedded corpus (default 6000)",
    )
    p.set_defaults(func=run_embedded)


def run_embedded(args: argparse.Namespace) -> int:
    """Run `embedded`; returns the exit code (2 with `error: ...` on stderr for bad input)."""
    return embed(args.out, args.tokenizer, args.samples_per_shard, args.seed, args.max_docs_per_domain)


def embed(
    out: Path,
    tokenizer: Path | None = None,
    samples_per_shard: int = 1000,
    seed: int | None = None,
    max_docs_per_domain: int | None = None,
) -> int:
    """Build the embedded corpus into ``out`` and prepare it to ``out/train``; returns the exit code."""
    from mates_lab.data.embedded import EmbeddedCorpusConfig, EmbeddedCorpusError, build_embedded_corpus

    try:
        # Validate every option before the (slow) gathering starts: the configs name the bad field.
        given = {"seed": seed, "max_docs_per_domain": max_docs_per_domain}
        embedded_cfg = EmbeddedCorpusConfig(**{k: v for k, v in given.items() if v is not None})
        prepare_cfg = PrepareConfig(
            input=out / "corpus.jsonl",
            output_prefix=out / "train",
            tokenizer=tokenizer or default_tokenizer_path(),
            samples_per_shard=samples_per_shard,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        built = build_embedded_corpus(embedded_cfg, out)
        prepared = prepare_corpus(prepare_cfg)
    except (PrepareError, EmbeddedCorpusError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(prepared)
    print(f"corpus:          {built['corpus']}")
    print(f"reference set:   {built['reference']} ({built['reference_examples']} examples)")
    print(f"eval set:        {built['eval_lambada']} ({built['eval_examples']} examples)")
    held = built["heldout_docs_per_domain"]
    per_domain = ", ".join(f"{name} {n}" for name, n in held.items())
    print(f"held-out docs:   {built['heldout']} ({sum(held.values())} documents: {per_domain})")
    return 0
