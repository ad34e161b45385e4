"""`mates-lab bench decoys`: the demo's arms on the embedded corpus plus a decoy set (``mates_lab.data.decoys``).

The decoys are near-duplicates of a few reference-like documents. A static scorer keeps choosing them after
the model has learned them; a model-aware one should not. The run is `bench demo-seeds` on a copy of the demo
config whose ``data_prefix`` is the corpus with the decoys (everything else, the probe reference and the
held-out sets included, is the demo's). Figures: `bench demo-seeds`'s (both headlines, paired intervals), and
per arm and round the decoys' share of the selection over seeds, beside their share of the pool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mates_lab.bench.intervals import mean_ci
from mates_lab.data.decoys import DecoyConfig, build_decoy_corpus


def decoy_shares(work: Path, seeds: list[int], arms: list[str], domain: str) -> dict[str, Any]:
    """Per arm, the decoys' share of each round's selection: per seed and mean with 95% t-interval."""
    from mates_lab.bench.demo_seeds import seed_dir

    out: dict[str, Any] = {}
    for arm in arms:
        rows = []
        for s in seeds:
            run = json.loads((seed_dir(work, s) / arm / "metrics.json").read_text())
            rows.append(
                [r.get(domain, 0.0) for r in (run.get("selection") or {}).get("selected_share_by_domain", [])]
            )
        out[arm] = [mean_ci(col) for col in zip(*rows, strict=True)]
    return out


def bench_decoys(
    config: Path, work: Path, seeds: list[int], arms: str, *, data: Path = Path("data/embedded"),
    decoys: DecoyConfig | None = None, run: bool = True,
) -> dict[str, Any]:  # fmt: skip
    from mates_lab.bench.demo_seeds import bench_demo_seeds
    from mates_lab.demo import parse_arms

    decoys = decoys or DecoyConfig()
    built = build_decoy_corpus(data, work / "data", decoys)
    cfg = {**yaml.safe_load(Path(config).read_text()), "data_prefix": built["prefix"]}
    run_config = work / "config.yaml"
    run_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = bench_demo_seeds(run_config, work / "seeds", seeds, arms, run=run)
    done = result["summary"]["seeds"]
    return {
        **result,
        "decoys": built,
        "decoy_pool_share": built["decoys"] / built["documents"],
        "decoy_share_by_round": decoy_shares(work / "seeds", done, parse_arms(arms), decoys.domain),
    }


def add_decoys_parser(bsub) -> None:
    from mates_lab.bench.output import write_result

    p = bsub.add_parser(
        "decoys",
        help="the demo's arms on the embedded corpus plus near-duplicates of a few reference-like documents: "
        "both headlines over seeds and each round's decoy share of the selection",
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="the demo's run config")
    p.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="the embedded corpus (its corpus.jsonl)"
    )
    p.add_argument(
        "--work", type=Path, default=Path("runs/bench_decoys"), help="decoy corpus and runs (resumable)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2, 3, 4, 5, 6, 7])
    p.add_argument(
        "--arms", default="random,mates,classifier", help="as the demo's --arms (default: %(default)s)"
    )
    p.add_argument("--gather", action="store_true", help="read the finished seeds only; train nothing")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(
        func=lambda a: write_result(
            bench_decoys(a.config, a.work, a.seeds, a.arms, data=a.data, run=not a.gather), a.out
        ) or 0
    )  # fmt: skip
