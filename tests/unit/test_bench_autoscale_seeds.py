"""`bench autoscale-seeds` end to end on a synthetic runner whose held-out losses follow a known law of
each domain's tokens: every figure the bench reports is checked against the law at the weights it chose."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from mates_lab.bench.autoscale_seeds import (
    MIXTURES,
    bench_autoscale_seeds,
    merge_seed_results,
    weight_distance,
)
from mates_megatron.mixture.weights import read_weights

DOMAINS = ["a", "b", "c"]
LAW = {"a": (2.0, 8.0, 0.3), "b": (3.0, 20.0, 0.5), "c": (2.5, 4.0, 0.2)}  # loss = e + B (tokens/1e3)^-g
TOKENS = {"a": 1e6, "b": 1e6, "c": 9_000}  # c small: the cap binds on it at the target


def _loss(d, tokens, seed):
    e, b, g = LAW[d]
    return e + b * (tokens / 1e3) ** (-g) + 0.01 * math.sin(3 * seed + DOMAINS.index(d))


def _runner(calls):
    def run(config, args):
        cfg = yaml.safe_load(config.read_text())
        w = read_weights(cfg["selection"]["selector_options"]["weights"]).at(0)
        per_step = cfg["global_batch_size"] * cfg["model"]["seq_length"]
        losses = {d: _loss(d, w[d] * cfg["train_iters"] * per_step, cfg["seed"]) for d in w}
        ev = {f"{s}/{d}": [9.0, v] for d, v in losses.items() for s in ("val", "test")}
        (config.parent / "metrics.json").write_text(json.dumps({"eval": ev}))
        calls.append(config.parent.name)
        return 0

    return run


def _data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    meta = {"domains": DOMAINS, "tokens_per_domain": TOKENS}
    (data / "train.meta.json").write_text(json.dumps(meta))
    rows = [{"text": "x" * 500, "domain": d} for d in DOMAINS for _ in range(2)]
    (data / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def test_bench_figures_follow_the_law(tmp_path):
    data = _data(tmp_path)
    calls: list[str] = []
    r = bench_autoscale_seeds(data, tmp_path / "work", steps=20, seeds=(0, 1), runner=_runner(calls))
    target_tokens = 160 * 16 * 64
    assert r["target_tokens"] == target_tokens
    losses = {m: [] for m in MIXTURES}
    for seed in (0, 1):
        s = r["per_seed"][seed]
        w = s["weights"]
        # the capped AutoScale mixture repeats no domain and is the cap of the uncapped one
        assert all(w["autoscale_capped"][d] * target_tokens <= TOKENS[d] + 1e-6 for d in DOMAINS)
        assert w["autoscale_capped"]["c"] == pytest.approx(TOKENS["c"] / target_tokens)
        for m in MIXTURES:
            want = np.mean([_loss(d, w[m][d] * target_tokens, seed) for d in DOMAINS])
            assert s["loss"][m] == pytest.approx(want)
            losses[m].append(want)
        ddo_mid = s["ddo"]["40"]
        assert s["interpolation"]["linf"] == pytest.approx(
            weight_distance(s["interpolation"]["predicted"], ddo_mid)["linf"]
        )
        assert 0 < s["interpolation"]["t"] < 1 < s["extrapolation"]["t"]
    summ = r["summary"]
    for m in MIXTURES:
        assert summ["loss"][m]["per_seed"] == pytest.approx(losses[m])
    diff = [a - b for a, b in zip(losses["autoscale"], losses["uniform"], strict=True)]
    assert summ["paired"]["autoscale-uniform"]["mean"] == pytest.approx(np.mean(diff))
    spread = summ["weights"]["ddo_spread"]["40"]["pairs"]["0-1"]
    assert spread == pytest.approx(
        weight_distance(r["per_seed"][0]["ddo"]["40"], r["per_seed"][1]["ddo"]["40"])
    )
    # 3 budgets x 7 proxy runs + 4 target mixtures per seed; a second call trains nothing
    assert len(calls) == 2 * (3 * 7 + 4)
    bench_autoscale_seeds(data, tmp_path / "work", steps=20, seeds=(0, 1), runner=_runner(calls))
    assert len(calls) == 2 * (3 * 7 + 4)


def test_seeds_run_apart_merge_into_the_figures_of_one_run(tmp_path):
    """``--merge``: seeds run in their own processes and work directories give, merged, the summary one run
    over both seeds gives; a seed in two files or another setting is refused."""
    data, calls = _data(tmp_path), []
    both = bench_autoscale_seeds(data, tmp_path / "both", steps=20, seeds=(0, 1), runner=_runner(calls))
    paths = []
    for seed in (0, 1):
        r = bench_autoscale_seeds(data, tmp_path / f"w{seed}", steps=20, seeds=(seed,), runner=_runner(calls))
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(r))
    merged = merge_seed_results(paths)
    assert sorted(merged["per_seed"]) == [0, 1]
    assert merged["summary"] == json.loads(json.dumps(both["summary"]))
    with pytest.raises(ValueError, match="seed 0 is in more than one"):
        merge_seed_results([paths[0], paths[0]])
    other = json.loads(paths[1].read_text())
    other["warmup"] = 99
    paths[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differ in warmup: not the same setting"):
        merge_seed_results(paths)
