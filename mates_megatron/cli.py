"""`mates-megatron` console script."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mates_megatron import __version__

LAB_COMMANDS = {"demo", "bench", "embedded"}
"""Commands of the lab's `mates-lab` (formerly here): named with their new home when typed here."""


def _add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="launch Megatron-Core GPT pretraining under torchrun",
        description=(
            "Runs `torchrun --nproc-per-node N -m mates_megatron.pretrain --config CONFIG [ARGS...]`. "
            "Arguments after the known "
            "options go to the training script (Megatron-LM style flags such as --train-iters 100)."
        ),
    )
    p.add_argument("--config", type=Path, default=Path("configs/cpu_tp2.yaml"), help="YAML run config")
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes (default: TP x PP of the config)"
    )
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace, rest: list[str]) -> int:
    if not args.config.is_file():
        print(
            f"error: config {args.config} not found (run from the repository root or pass --config)",
            file=sys.stderr,
        )
        return 2
    from mates_megatron.pretrain import launch_checked

    # What both ranks would refuse at their start is refused once there: torchrun never starts.
    return launch_checked(args.config, rest, args.nproc_per_node)


def _checked_runner(config: Path, rest: list[str], nproc_per_node: int | None = None) -> int:
    """The mixture commands' proxy and pilot runs: refused before torchrun as `pretrain` refuses a run."""
    from mates_megatron.pretrain import launch_checked

    return launch_checked(config, rest, nproc_per_node)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mates-megatron",
        description="Model-aware data selection (MATES) for Megatron-Core pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"mates-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from mates_megatron.data.commands import add_prepare_parser
    from mates_megatron.mixture.commands import add_mixture_parser
    from mates_megatron.ot.commands import add_value_parser
    from mates_megatron.trace.run import add_trace_parser

    add_prepare_parser(sub)
    _add_pretrain_parser(sub)
    add_value_parser(sub)
    add_mixture_parser(sub, runner=_checked_runner)
    add_trace_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mates_megatron.pretrain import silence_megatron_core_notices

    silence_megatron_core_notices()  # prepare and the benches import megatron-core too
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LAB_COMMANDS:
        print(
            f"error: `mates-megatron {argv[0]}` is the lab's: run `mates-lab {argv[0]}` (pip install '.[lab]')",
            file=sys.stderr,
        )
        return 2
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "pretrain":
        return args.func(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
