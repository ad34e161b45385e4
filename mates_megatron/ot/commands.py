"""`mates-megatron value`: value a WebDataset pool against a reference set offline (LAVA, GOT-D, or the static
n-gram scorers: the classifier, DSIR), and write the values beside the shards (``<shards>/values/<name>.npy`` +
``.json``; the pool is never rewritten). Any run then selects with them: ``scorer: values`` with
``scorer_options: {path: ...}``, or filters each round with them (``filters: [{kind: values, ...}]``).

The whole pool is one round of the scorer (``scorers/lava.py``, ``scorers/gotd.py``, ``scorers/classifier.py``,
``scorers/dsir.py``): the same embeddings, transport and calibration as a run computes, over every candidate at
once. The classifier's scores are a run's own (its fit depends on the selection seed, the pool and the
reference only); DSIR's raw distribution is the whole pool's (the paper's), where a run fits each round's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

METHODS = ("lava", "gotd", "classifier", "dsir")
"""The OT valuations, and the static n-gram scorers: their scores never change during a run, so a filter of a
round can read them precomputed (``filters: [{kind: values, path: ..., keep: ...}]``) instead of scoring the
round's candidates on the training ranks."""


def add_value_parser(sub) -> None:
    p = sub.add_parser(
        "value",
        help="value a pool against a reference set (LAVA, GOT-D, the n-gram classifier, DSIR) and write the "
        "values beside its shards",
        description=(
            "Scores every candidate of a WebDataset pool against the reference (lava, gotd: the influence "
            "encoder's embeddings and the streamed Sinkhorn transport; classifier, dsir: hashed word n-grams, the "
            "whole pool as the raw data), and writes SHARDS/values/NAME.npy (one float64 per candidate id, lower "
            "= more useful) and NAME.json. Select with them in any run: scorer: values, scorer_options: {path: "
            "SHARDS/values/NAME.npy}, selector: topk; or filter each round with them: filters: [{kind: values, "
            "path: SHARDS/values/NAME.npy, keep: 0.5}] (the scores the run's own classifier filter would give, "
            "with the same --seed as the run's selection seed, computed once instead of every round)."
        ),
    )
    p.add_argument("--shards", type=Path, required=True, help="WebDataset pool directory (with its manifest)")
    p.add_argument(
        "--reference", type=Path, required=True, help='reference JSONL ({"text"} or {"context","target"})'
    )
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--name", default=None, help="values file name (default: the method)")
    p.add_argument(
        "--options",
        default="{}",
        help="the scorer's options as YAML/JSON, e.g. '{labelled: true, epsilon: 0.05}'",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the solver's warm-start subsample")
    p.set_defaults(func=run_value)


def value_pool(shards: Path, reference: Path, method: str, options: dict, seed: int = 0):
    """(values, meta) of every candidate of the pool at ``shards``."""
    from mates_megatron.config import SelectionConfig
    from mates_megatron.files import sha256_file
    from mates_megatron.pool.webdataset_pool import WebDatasetPool
    from mates_megatron.probe.reference import ReferenceFile
    from mates_megatron.scorers import RoundInput

    if not reference.is_file():
        raise FileNotFoundError(f"reference {reference} not found: pass a JSONL file")
    pool = WebDatasetPool(shards, seq_length=1)
    sel = SelectionConfig(scorer=method, selector="topk", scorer_options=options, seed=seed)
    # No host offline: the OT scorers are given the reference file they would read from the host's reference
    # set; the n-gram scorers read it from a host that has nothing else.
    ref = ReferenceFile(str(reference))
    ngram = method in ("classifier", "dsir")
    scorer = sel.build_scorer() if ngram else sel.build_scorer(reference=ref)
    host = SimpleNamespace(reference=ref) if ngram else None
    ids = np.arange(len(pool), dtype=np.int64)
    t = time.perf_counter()
    scores = scorer.score(RoundInput(round=0, candidates=ids, pool=pool, host=host, seed=seed))
    meta = {
        "method": method,
        "options": options,
        "seed": seed,
        "reference": str(reference),
        "reference_sha256": sha256_file(reference),
        "pool_fingerprint": pool.fingerprint(),
        "seconds": time.perf_counter() - t,
        "record": scores.record,
    }
    return scores.scores, meta, pool


def run_value(args: argparse.Namespace) -> int:
    from mates_megatron.ot.values_file import write_values

    try:
        options = yaml.safe_load(args.options) or {}
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a mapping, got {args.options!r}")
        values, meta, _ = value_pool(args.shards, args.reference, args.method, options, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_values(args.shards, args.name or args.method, values, meta)
    rec = meta["record"]
    how = (
        f" (sinkhorn: {rec.get('sinkhorn_iterations')} passes, marginal error "
        f"{rec.get('sinkhorn_marginal_error', float('nan')):.2e})"
        if args.method in ("lava", "gotd")
        else ""
    )
    print(f"[mates-megatron] valued {len(values)} candidates in {meta['seconds']:.1f}s{how} -> {path}")
    print(json.dumps({"path": str(path), "min": float(values.min()), "max": float(values.max())}))
    return 0
