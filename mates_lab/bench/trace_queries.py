"""`mates-lab bench trace-queries`: seconds and memory per query of forward-inf and gradient-dot against the
number of queries traced together (Ko et al.'s claim: Forward-INF pays off when the queries are few).

The model and pool come from a finished ``bench trace`` seed (its checkpoint, trained on its pool): the
first ``pool_docs`` documents of that pool are prepared as the fixed training set, and 1, 2, 4, ..., 64
reference examples (cut to the model's window) are the queries. Both tracers run in one torchrun worker
(``tp`` processes) on the same loaded model: first one untimed query per method (warm-up), then each query
count. Per (method, count): seconds per query (the tracer's own clock: the pool's passes and the queries'
steps, not the model's loading) and peak memory: the worker's resident set high-water mark (VmHWM, reset
through ``/proc/self/clear_refs`` before the call) above its resident set when the call starts, on rank 0,
in MiB. What it counts: everything the call allocates (query gradients, activations, the pool's reader),
not the model already in memory. A cost model of the two: forward-inf = one forward pass per document for
the loss before, plus per query one descent step and a forward pass per document; gradient-dot = one
backward pass per document (all queries at once, up to 64 query gradients held) plus one per query.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

COUNTS = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("forward-inf", "gradient")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> int:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0); the RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_kib() -> int:
    return _status_kib("VmHWM")


def prepare(data: Path, source: Path, work: Path, pool_docs: int, queries: int, seed: int) -> dict:
    """The fixed training set (the first ``pool_docs`` of ``source``'s pool) and the query files."""
    from mates_lab.bench.trace import MODEL, leak_examples
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus
    from mates_megatron.data.tokenizer import load_tokenizer

    if not (source / "ckpt").is_dir() or not (source / "corpus.jsonl").is_file():
        raise ValueError(f"{source} holds no trained bench trace seed: run `mates-lab bench trace` first")
    work.mkdir(parents=True, exist_ok=True)
    lines = [x for x in (source / "corpus.jsonl").read_text().splitlines() if x.strip()][:pool_docs]
    if len(lines) < pool_docs:
        raise ValueError(f"{source} has {len(lines)} documents, {pool_docs} asked for")
    (work / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    prepared = prepare_corpus(
        PrepareConfig(input=work / "corpus.jsonl", output_prefix=work / "data" / "train")
    )
    tok = load_tokenizer(None)
    examples = leak_examples(data / "reference.jsonl", queries, tok, MODEL["seq_length"] - 8, seed)
    files = {}
    for n in sorted({*[c for c in COUNTS if c <= queries], 1}):
        path = work / f"queries_{n}.jsonl"
        path.write_text(
            "".join(json.dumps({"id": f"q-{i}", **ex}) + "\n" for i, ex in enumerate(examples[:n]))
        )
        files[n] = str(path)
    return {"shards": str(prepared.shards_dir), "files": files}


def bench_trace_queries(
    data: Path,
    source: Path,
    work: Path,
    *,
    pool_docs: int = 64,
    max_queries: int = 64,
    tp: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds and peak memory per query of each method at each query count (``COUNTS`` up to
    ``max_queries``), in one torchrun worker on ``source``'s trained model."""
    from mates_megatron.launch import torchrun

    t0 = time.perf_counter()
    prep = prepare(data, source, work, pool_docs, max_queries, seed)
    spec = {
        "config": str(source / "config.yaml"), "load": str(source / "ckpt"), "tp": tp, **prep,
        "out": str(work / "queries_result.json"),
    }  # fmt: skip
    if torchrun(__name__, ["--spec", json.dumps(spec)], tp):
        raise RuntimeError("the trace-queries worker failed")
    rows = json.loads(Path(spec["out"]).read_text())
    out: dict[str, Any] = {
        "pool_documents": pool_docs,
        "tensor_parallel": tp,
        "memory": "peak RSS above the call's start (VmHWM, rank 0), MiB",
    }
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["queries"])
        out[method] = {
            str(r["queries"]): {k: r[k] for k in ("seconds_per_query", "seconds", "peak_mib")} for r in mine
        }
    sec = {m: {int(n): v["seconds_per_query"] for n, v in out[m].items()} for m in METHODS}
    cheaper = [n for n in sorted(sec["gradient"]) if sec["forward-inf"][n] < sec["gradient"][n]]
    out["forward_inf_cheaper_at"] = cheaper
    out["linear_fit"] = linear_fit(out, pool_docs)
    out["seconds"] = time.perf_counter() - t0
    return out


def linear_fit(out: dict, pool_docs: int) -> dict:
    """Each method's total seconds as ``fixed + per_query * Q`` (least squares over the query counts), and
    the query count where the two totals cross. Forward-INF's per-query part is a pass over the pool and its
    fixed part the loss before; gradient-dot's fixed part is the pool's backward passes and its per-query part
    a query's gradient: per pool document, the crossing tends to (backward / forward) as the pool grows."""
    import numpy as np

    fit = {}
    for m in METHODS:
        q = np.array([int(n) for n in out[m]], dtype=float)
        t = np.array([v["seconds"] for v in out[m].values()])
        per_query, fixed = np.polyfit(q, t, 1)
        fit[m] = {"fixed_seconds": float(fixed), "per_query_seconds": float(per_query)}
    f, g = fit["forward-inf"], fit["gradient"]
    slope = f["per_query_seconds"] - g["per_query_seconds"]
    fit["crossing_queries"] = float((g["fixed_seconds"] - f["fixed_seconds"]) / slope) if slope > 0 else None
    fit["per_document"] = {
        "forward_inf_seconds_per_query": f["per_query_seconds"] / pool_docs,
        "gradient_fixed_seconds": g["fixed_seconds"] / pool_docs,
    }
    if f["per_query_seconds"] > 0:
        fit["large_pool_crossing_queries"] = g["fixed_seconds"] / f["per_query_seconds"]
    return fit


def worker(spec: dict) -> None:
    """Every rank: load the model once, then trace each (method, count); rank 0 writes the rows."""
    import torch.distributed as dist

    from mates_megatron.trace.run import TraceConfig, model_context, run_trace

    def cfg(method: str, n: int) -> TraceConfig:
        return TraceConfig(
            method=method, shards=spec["shards"], queries=spec["files"][str(n)], config=spec["config"],
            load=spec["load"], top_k=10, tensor_model_parallel_size=spec["tp"], show_progress=False,
        )  # fmt: skip

    model = model_context(cfg(METHODS[0], 1))
    counts = sorted(int(n) for n in spec["files"])
    rows = []
    for method in METHODS:
        run_trace(
            cfg(method, 1), model
        )  # warm-up: first-call costs (page cache, allocator) are not a query's
        for n in counts:
            start = reset_peak()
            result, _, _ = run_trace(cfg(method, n), model)
            peak = peak_kib()
            sec = float(result.record["seconds"])
            rows.append({"method": method, "queries": n, "seconds": sec, "seconds_per_query": sec / n,
                         "peak_mib": (peak - start) / 1024})  # fmt: skip
            if dist.get_rank() == 0:
                print(
                    f"[trace-queries] {method} x {n}: {sec / n:.3f} s/query, +{(peak - start) / 1024:.0f} MiB",
                    flush=True,
                )
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(rows, indent=1))
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mates_megatron.pretrain import silence_megatron_core_notices

    silence_megatron_core_notices()
    p = argparse.ArgumentParser(prog="python -m mates_lab.bench.trace_queries")
    p.add_argument("--spec", required=True)
    worker(json.loads(p.parse_args(argv).spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def add_trace_queries_parser(bsub) -> None:
    """The ``bench trace-queries`` sub-command (registered from ``mates_lab.bench``)."""
    from mates_lab.bench.output import write_result

    q = bsub.add_parser(
        "trace-queries",
        help="forward-inf vs gradient-dot: seconds and peak memory per query at 1..64 queries on a bench trace model",
    )
    q.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    q.add_argument(
        "--source",
        type=Path,
        default=Path("runs/bench_trace/seed-0"),
        help="a finished bench trace seed (model, pool)",
    )
    q.add_argument("--work", type=Path, default=Path("runs/bench_trace_queries"))
    q.add_argument("--pool-docs", type=int, default=64, help="documents of the fixed training set")
    q.add_argument("--max-queries", type=int, default=64)
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel processes of the worker")
    q.add_argument("--out", type=Path, default=None)
    q.set_defaults(
        func=lambda a: (
            write_result(
                bench_trace_queries(
                    a.data, a.source, a.work, pool_docs=a.pool_docs, max_queries=a.max_queries, tp=a.tp
                ),
                a.out,
            )
            or 0
        )
    )
