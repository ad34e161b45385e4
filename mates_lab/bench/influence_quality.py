"""`mates-lab bench influence-quality`: how well influence models predict oracle scores.

Two rounds on the embedded data: warm up a small GPT, score `probes` pool documents with the linearized
oracle (it ranks exactly like the locally probed oracle here: Spearman 1.0 in `bench probe`), train on, score
a fresh set. Then, on the second round's held-out split: ridge regression on frozen mean-pooled encoder
embeddings, the fine-tuned encoder from scratch, and the fine-tuned encoder warm-started from round one.
"""

from __future__ import annotations

import numpy as np
import torch

from mates_megatron.influence.ridge import ridge_solve


def _round_pairs(trainer, pool, ids, seq_length, ref_batches, tokenizer):
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.estimators import LinearizedProber
    from mates_megatron.probe.reference import make_batch

    samples, texts = [], []
    for gid in ids:
        s = pool.training_sample(int(gid))
        row = np.concatenate([s["tokens"], s["labels"][-1:]])[None]
        samples.append(make_batch(row, s["loss_mask"][None]))
        n = int(s["loss_mask"].sum()) + 1
        texts.append(tokenizer.decode(row[0, :n].tolist()))
    ctx = ProbeContext(
        trainer.model_chunks,
        trainer.optimizer,
        trainer.scheduler,
        ref_batches,
        seq_length,
        trainer.device,
        show_progress=False,
    )
    return texts, LinearizedProber(ctx).score(samples).scores


def _ridge(train_x, train_y, test_x, alpha=1.0):
    w, b = ridge_solve(train_x, train_y, alpha)
    return test_x @ w + b


def _worker(data_dir: str, probes: int, warmup: int, between: int, epochs: int) -> dict:
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig
    from mates_megatron.influence.encoder import EncoderRegressor
    from mates_megatron.influence.finetune import FinetuneInfluenceModel, split
    from mates_megatron.pool.webdataset_pool import WebDatasetPool
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.probe.reference import load_reference_set
    from mates_megatron.stats import spearman
    from mates_megatron.training.loop import Trainer

    seq = 128
    cfg = train_config_from_dict({
        "data_prefix": f"{data_dir}/train",
        "model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": seq},
        "parallel": {"cpu": not torch.cuda.is_available()}, "micro_batch_size": 16, "global_batch_size": 16,
        "train_iters": warmup + between + 1, "lr": 2e-3, "lr_warmup_iters": 5, "log_interval": 10**9, "seed": 7,
    })  # fmt: skip
    trainer = Trainer(cfg)
    tok = load_tokenizer()
    ref = load_reference_set(f"{data_dir}/reference.jsonl", tok, seq)
    from mates_megatron.probe.reference import ReferenceSet

    ref_batches = ReferenceSet(ref.tokens[:64], ref.loss_mask[:64], ref.path).micro_batches(16)
    pool = WebDatasetPool(f"{data_dir}/train-shards", seq_length=seq)
    perm = np.random.default_rng(3).permutation(pool.num_candidates)
    for _ in range(warmup):
        trainer.step()
    texts1, scores1 = _round_pairs(trainer, pool, perm[:probes], seq, ref_batches, tok)
    for _ in range(between):
        trainer.step()
    texts2, scores2 = _round_pairs(trainer, pool, perm[probes : 2 * probes], seq, ref_batches, tok)

    icfg = InfluenceConfig(
        max_length=256,
        max_chunks=1,
        finetune=FinetuneConfig(epochs=epochs, batch_size=16, val_fraction=0.2, lr=5e-5),
    )
    train_idx, val_idx = split(len(texts2), icfg.finetune.val_fraction, icfg.seed)
    torch.manual_seed(0)
    frozen = EncoderRegressor(icfg)
    emb = []
    with torch.no_grad():
        for s in range(0, len(texts2), 32):
            ids, mask = frozen.encode_texts(texts2[s : s + 32])
            emb.append(frozen.embed(ids, mask).numpy())
    emb = np.concatenate(emb)
    ridge = spearman(_ridge(emb[train_idx], scores2[train_idx], emb[val_idx]), scores2[val_idx])

    # Each model loads its encoder after torch.manual_seed(icfg.seed) (0) at its first fit.
    cold = FinetuneInfluenceModel(icfg).fit(texts2, scores2)
    warm_model = FinetuneInfluenceModel(icfg)  # warm_start: the second fit continues from the first
    first = warm_model.fit(texts1, scores1)
    # How well round one's model ranks round two before any refit (what warm start starts from).
    carry = spearman(warm_model.predict([texts2[i] for i in val_idx]), scores2[val_idx])
    warm = warm_model.fit(texts2, scores2)
    return {
        "probes_per_round": probes,
        "oracle": "linearized (Spearman 1.0 vs the locally probed oracle in bench probe)",
        "score_std_round2": float(np.std(scores2)),
        "heldout": int(len(val_idx)),
        "ridge_frozen_spearman": round(ridge, 4),
        "finetuned_cold_spearman": round(cold.spearman, 4),
        "finetuned_warm_spearman": round(warm.spearman, 4),
        "round1_finetuned_spearman": round(first.spearman, 4),
        "round1_model_on_round2_heldout_spearman": round(carry, 4),
        "cold_history": cold.history,
        "warm_history": warm.history,
    }


def bench_influence_quality(data_dir="data/embedded", probes=640, warmup=40, between=40, epochs=3) -> dict:
    from mates_megatron.compat.spawn import run_on_ranks

    return run_on_ranks(
        _worker, 1, data_dir, probes, warmup, between, epochs, timeout=7200, cuda=torch.cuda.is_available()
    )[0]
