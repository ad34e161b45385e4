"""`mates-lab bench influence` at toy size: candidates/s end to end per loader_workers setting and on
pre-tokenised input, and the FLOP bound from the encoder's FLOPs per candidate, counted here independently."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.distributed]  # forks loader workers


def test_bench_influence_reports_rates_and_the_flop_bound(small_embedded):
    from mates_lab.bench.influence import bench_influence
    from mates_megatron.cost import TransformerShape
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.influence.config import InfluenceConfig
    from mates_megatron.pool.indexed_pool import IndexedPool
    from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset

    n, seq, max_length = 12, 64, 24
    r = bench_influence(
        small_embedded["dir"], n=n, seq_length=seq, max_length=max_length, batch_size=5, workers=(0, 2),
        fit_samples=4,
    )  # fmt: skip
    for key in ("end_to_end_candidates_per_s", "host_candidates_per_s", "token_embeddings_candidates_per_s"):
        assert set(r[key]) == {"0", "2"} and all(v > 0 for v in r[key].values()), key
    assert r["pretokenised_candidates_per_s"] > 0 and r["train_samples_per_s"] > 0
    assert r["device_flops_source"].startswith("measured: float32 matmul")
    assert r["flop_bound_candidates_per_s"] == round(
        r["device_flops_per_s"] / r["encoder_flops_per_candidate"], 2
    )
    assert len(r["load_average_before"]) == len(r["load_average_after"]) == 3

    # The FLOPs per candidate, counted from the same candidates decoded and tokenised here.
    prefix = small_embedded["prefix"]
    info = TokenizerInfo.from_meta(prefix)
    ds = build_gpt_dataset(
        prefix, seq_length=seq, num_samples=n, seed=0, tokenizer=info, cache_dir=small_embedded["dir"] / "c"
    )
    pool = IndexedPool(ds, prefix, tokenizer=load_tokenizer(info.path))
    shape = TransformerShape.from_encoder_dir(InfluenceConfig().resolved_path())
    enc = load_tokenizer(InfluenceConfig().resolved_path())
    body = max_length - 2
    flops, tokens = 0.0, 0
    for gid in range(n):
        ids = enc(pool.text(gid), add_special_tokens=False)["input_ids"][: body * 2] or [0]
        for s in range(0, len(ids), body):
            length = len(ids[s : s + body]) + 2  # [CLS] ... [SEP]
            flops += shape.forward_flops_per_token(length, logits=False) * length
            tokens += length
    assert r["encoder_tokens_per_candidate"] == round(tokens / n, 1)
    np.testing.assert_allclose(r["encoder_flops_per_candidate"], flops / n, rtol=1e-12)
    assert r["padded_tokens_per_candidate"] >= r["encoder_tokens_per_candidate"]

    given = bench_influence(
        small_embedded["dir"], n=n, seq_length=seq, max_length=max_length, workers=(0,), fit_samples=0,
        device_tflops=2.0,
    )  # fmt: skip
    assert given["device_flops_per_s"] == 2e12 and given["device_flops_source"] == "given (--device-tflops)"
    assert "train_samples_per_s" not in given
