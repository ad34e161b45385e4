"""`mates-megatron` console script."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mates_megatron import __version__


def _add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="launch Megatron-Core GPT pretraining under torchrun (prepares the embedded data if missing)",
        description=(
            "Runs `torchrun --nproc-per-node N -m mates_megatron.pretrain --config CONFIG [ARGS...]`. "
            "If the config trains on data/embedded and it does not exist yet, runs "
            "`mates-megatron prepare --embedded --out data/embedded` first; if it exists, refuses data an "
            "older builder wrote. Arguments after the known "
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
    return launch_pretrain(args.config, rest, args.nproc_per_node)


def launch_pretrain(config: Path, rest: list[str], nproc_per_node: int | None = None) -> int:
    """torchrun the pretraining entry point on ``config``; prepares data/embedded first if it is missing."""
    cfg = yaml.safe_load(config.read_text()) or {}
    prefix = Path(cfg.get("data_prefix", ""))
    if "--data-path" not in rest and prefix.parent == Path("data/embedded"):
        if not Path(f"{prefix}.bin").is_file():
            print(
                f"[mates-megatron] preparing the embedded data into {prefix.parent} (first run only)",
                flush=True,
            )
            rc = main(["prepare", "--embedded", "--out", str(prefix.parent)])
            if rc:
                return rc
        else:
            from mates_megatron.data.embedded import EmbeddedCorpusError
            from mates_megatron.data.embedded_check import check_embedded_data

            try:
                warning = check_embedded_data(prefix.parent)
            except EmbeddedCorpusError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if warning:
                print(f"[mates-megatron] warning: {warning}", flush=True)
    par = cfg.get("parallel", {}) or {}
    nproc = nproc_per_node or int(par.get("tensor_model_parallel_size", 1)) * int(
        par.get("pipeline_model_parallel_size", 1)
    )
    return torchrun("mates_megatron.pretrain", ["--config", str(config), *rest], nproc)


def torchrun(module: str, args: list[str], nproc: int) -> int:
    """``torchrun --nproc-per-node nproc -m module args...`` with one share of the cores per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", module, *args]
    print("[mates-megatron] " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ)
    # One intra-op thread per process: N processes share the machine's cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mates-megatron",
        description="Model-aware data selection (MATES) for Megatron-Core pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"mates-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from mates_megatron.bench import add_bench_parser
    from mates_megatron.data.commands import add_prepare_parser
    from mates_megatron.demo import add_demo_parser
    from mates_megatron.mixture.commands import add_mixture_parser
    from mates_megatron.ot.commands import add_value_parser
    from mates_megatron.trace.run import add_trace_parser

    add_prepare_parser(sub)
    _add_pretrain_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_value_parser(sub)
    add_mixture_parser(sub)
    add_trace_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mates_megatron.pretrain import silence_megatron_core_notices

    silence_megatron_core_notices()  # prepare and the benches import megatron-core too
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
