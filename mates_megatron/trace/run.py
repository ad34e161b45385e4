"""`mates-megatron trace`: the top-k pool documents behind each query, by one of the ``TRACERS``.

    mates-megatron trace --method forward-inf --config RUN.yaml --load CKPT --shards POOL \\
        --queries QUERIES.jsonl --out TRACE.jsonl

The model is the run's (its YAML config), its weights the latest checkpoint in ``--load`` (any TP/PP/DP
layout: they load into this trace's layout, which may differ). The model-based methods run under torchrun
on TP x PP processes (the run's parallel settings, or ``--tensor-model-parallel-size`` and
``--pipeline-model-parallel-size``); BM25 needs no model and runs in this process. Output: one JSON line
per query (``id``, ``ids``, ``scores``, and ``supportive`` for FASTTRACK), and ``TRACE.jsonl.meta.json``
with the method, its options and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mates_megatron.files import write_jsonl
from mates_megatron.trace.base import TRACERS, Queries, TraceInput, TraceResult

# Registered by import: every tracer module.
from mates_megatron.trace import bm25, fasttrack, forward_inf, gradient  # noqa: E402,F401  # isort: skip


@dataclass
class TraceConfig:
    method: str
    shards: str
    """The pool: a WebDataset shard directory with its manifest (`mates-megatron prepare` writes one)."""
    queries: str
    """JSONL: {"context", "target"} (the target tokens are the fact) or {"text"}; optional "id"."""
    config: str | None = None
    """The run's YAML config (the model); not needed for bm25."""
    load: str | None = None
    """The run's checkpoint directory (its latest iteration is traced)."""
    top_k: int = 10
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    chunk: int = 256
    tensor_model_parallel_size: int | None = None
    pipeline_model_parallel_size: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in TRACERS:
            raise ValueError(f"trace method {self.method!r}: use one of {', '.join(TRACERS.names())}")
        if self.top_k < 1 or self.chunk < 1:
            raise ValueError(f"top_k={self.top_k}, chunk={self.chunk}: both must be >= 1")
        if TRACERS.get(self.method).needs_model and not (self.config and self.load):
            raise ValueError(
                f"trace --method {self.method} needs the model: give --config RUN.yaml and --load CKPT"
            )
        # Not a field: the method's options as its Config (one coercion and validation path).
        self.tracer_config = TRACERS.get(self.method).build_options(
            self.options, name=self.method, where=f"trace --method {self.method} --options"
        )

    def tracer(self):
        return TRACERS.get(self.method)(self.tracer_config)


def load_queries(path: str | Path, tokenizer=None, seq_length: int | None = None) -> Queries:
    from mates_megatron.probe.reference import encode_examples, read_jsonl

    rows = read_jsonl(path, "queries")
    if not rows:
        raise ValueError(f"queries {path} is empty: it needs at least one JSON line")
    ids, texts = [], []
    for lineno, obj in rows:
        if "context" in obj and "target" in obj:
            texts.append(obj["context"] + obj["target"])
        elif "text" in obj:
            texts.append(obj["text"])
        else:
            raise ValueError(f'{path} line {lineno}: expected {{"context", "target"}} or {{"text"}}')
        ids.append(str(obj.get("id", f"line-{lineno}")))
    if len(set(ids)) != len(ids):
        raise ValueError(f'queries {path}: ids repeat; give every line its own "id"')
    encoded = encode_examples(rows, path, tokenizer, seq_length) if tokenizer is not None else None
    return Queries(ids=ids, texts=texts, rows=encoded, examples=[o for _, o in rows])


def _trainer(cfg: TraceConfig):
    """The run's model with the checkpoint's weights (no optimizer state, data order or selection)."""
    import yaml

    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.config import TrainConfig

    run = yaml.safe_load(Path(cfg.config).read_text()) or {}
    for key in ("selection", "eval_sets", "reference", "save", "load", "metrics"):
        run.pop(key, None)
    run["pretrained_checkpoint"] = cfg.load
    par = dict(run.get("parallel") or {})
    if cfg.tensor_model_parallel_size:
        par["tensor_model_parallel_size"] = cfg.tensor_model_parallel_size
    if cfg.pipeline_model_parallel_size:
        par["pipeline_model_parallel_size"] = cfg.pipeline_model_parallel_size
    run["parallel"] = par
    return build_trainer(build(TrainConfig, run, where=f"trace model ({cfg.config})"))


def model_context(cfg: TraceConfig):
    """(ProbeContext, tokenizer) of the run's model at the checkpoint: what the model methods trace with.
    Collective (builds the model-parallel groups)."""
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.probe.context import ProbeContext

    trainer = _trainer(cfg)
    ctx = ProbeContext.from_host(trainer, [])
    ctx.show_progress = cfg.show_progress
    return ctx, load_tokenizer(trainer.cfg.tokenizer or trainer.tokenizer_info.path)


def run_trace(cfg: TraceConfig, model=None) -> tuple[TraceResult, Queries, Any]:
    """Trace on this process: (result, queries, pool). The model methods run under torch.distributed on
    ``model`` (a ``model_context``; built from ``cfg`` when None), collectively; the model is left as found."""
    from mates_megatron.pool.webdataset_pool import WebDatasetPool

    tracer = cfg.tracer()
    ctx, tokenizer = (model or model_context(cfg)) if tracer.needs_model else (None, None)
    seq_length = ctx.seq_length if ctx is not None else 1
    pool = WebDatasetPool(cfg.shards, seq_length=seq_length)
    queries = load_queries(cfg.queries, tokenizer, seq_length if tokenizer is not None else None)
    inp = TraceInput(
        queries=queries, pool=pool, ids=np.arange(len(pool), dtype=np.int64), top_k=cfg.top_k, model=ctx,
        seed=cfg.seed, chunk=cfg.chunk, show_progress=cfg.show_progress,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = tracer.trace(inp)
    result.record.setdefault("seconds", time.perf_counter() - t0)
    return result, queries, pool


def write_trace(out: Path, cfg: TraceConfig, result: TraceResult, queries: Queries, pool) -> None:
    lines = []
    for q, qid in enumerate(queries.ids):
        keep = result.ids[q] >= 0
        line = {"id": qid, "ids": result.ids[q][keep].tolist(), "scores": result.scores[q][keep].tolist()}
        if result.verdicts is not None:
            line["supportive"] = result.verdicts[q].tolist()
        lines.append(line)
    write_jsonl(out, lines, ensure_ascii=True)
    meta = {
        "config": asdict(cfg), "method": result.method, "queries": len(queries), "pool_candidates": len(pool),
        "pool_fingerprint": pool.fingerprint(), "record": result.record,
        "seconds_per_query": result.record["seconds"] / len(queries),
    }  # fmt: skip
    meta_path = out.with_name(out.name + ".meta.json")
    meta_path.write_text(json.dumps(meta, indent=1, default=str))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=TRACERS.names(), required=True)
    p.add_argument("--shards", required=True, help="the pool's WebDataset shard directory")
    p.add_argument("--queries", required=True, help='JSONL of {"context", "target"} or {"text"} (+ "id")')
    p.add_argument(
        "--out", type=Path, required=True, help="JSONL written: the top-k ids and scores per query"
    )
    p.add_argument("--config", help="the run's YAML config (the model); model methods only")
    p.add_argument("--load", help="the run's checkpoint directory; model methods only")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--options", default="{}", help="the method's options as YAML, e.g. '{drop: 0.02}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-model-parallel-size", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: TP x PP)")


def config_from_args(a) -> TraceConfig:
    import yaml

    options = yaml.safe_load(a.options) or {}
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a mapping, got {a.options!r}")
    return TraceConfig(
        method=a.method, shards=a.shards, queries=a.queries, config=a.config, load=a.load, top_k=a.top_k,
        options=options, seed=a.seed, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
    )  # fmt: skip


def add_trace_parser(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="trace queries back to pool documents (forward-inf, fasttrack, gradient, bm25)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=launch)


def trace_command(argv: list[str]) -> int:
    """`mates-megatron trace ARGV...` from Python (the lab's benchmark runs it)."""
    p = argparse.ArgumentParser(prog="mates-megatron trace")
    _add_arguments(p)
    return launch(p.parse_args(argv))


def launch(a) -> int:
    """BM25 in this process; the model methods under torchrun on TP x PP processes (or --nproc-per-node)."""
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not TRACERS.get(cfg.method).needs_model:
        result, queries, pool = run_trace(cfg)
        write_trace(a.out, cfg, result, queries, pool)
        _report(a.out, result, queries)
        return 0
    import yaml

    par = (yaml.safe_load(Path(cfg.config).read_text()) or {}).get("parallel") or {}
    nproc = a.nproc_per_node or (
        cfg.tensor_model_parallel_size or int(par.get("tensor_model_parallel_size", 1))
    ) * (cfg.pipeline_model_parallel_size or int(par.get("pipeline_model_parallel_size", 1)))
    from mates_megatron.launch import torchrun

    return torchrun(__name__, ["--trace-config", json.dumps(asdict(cfg)), "--out", str(a.out)], nproc)


def _report(out: Path, result: TraceResult, queries: Queries) -> None:
    sec = result.record["seconds"]
    print(
        f"[trace] {result.method}: {len(queries)} queries in {sec:.1f}s ({sec / len(queries):.2f}s per query) -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    """The torchrun entry point (every rank); rank 0 writes the output."""
    import torch.distributed as dist

    from mates_megatron.pretrain import silence_megatron_core_notices

    silence_megatron_core_notices()
    p = argparse.ArgumentParser(prog="python -m mates_megatron.trace.run")
    p.add_argument("--trace-config", required=True, help="a TraceConfig as JSON (what `trace` launches with)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = TraceConfig(**json.loads(a.trace_config))
    result, queries, pool = run_trace(cfg)
    if dist.get_rank() == 0:
        write_trace(a.out, cfg, result, queries, pool)
        _report(a.out, result, queries)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
