"""`mates-lab` console script: the demo, the benchmarks and the embedded corpus (the lab's edge, a sink)."""

from __future__ import annotations

import argparse
import sys

from mates_megatron import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mates-lab",
        description="The mates-megatron lab: the demo, benchmarks and the embedded corpus they run on.",
    )
    parser.add_argument("--version", action="version", version=f"mates-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from mates_lab.bench import add_bench_parser
    from mates_lab.data.commands import add_embedded_parser
    from mates_lab.demo import add_demo_parser

    add_demo_parser(sub)
    add_bench_parser(sub)
    add_embedded_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mates_megatron.pretrain import silence_megatron_core_notices

    silence_megatron_core_notices()  # the benches import megatron-core
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
