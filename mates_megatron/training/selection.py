"""Wire a SelectionConfig into a training run: pool + PoolRounds + MatesSampler + MatesHook."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mates_megatron.config import SelectionConfig
from mates_megatron.hooks import MatesHook
from mates_megatron.pool.base import CandidatePool, PoolError, PoolRounds
from mates_megatron.pool.manifest import SelectionStore
from mates_megatron.sampler import MatesSampler


@dataclass
class SelectionParts:
    pool: CandidatePool
    rounds: PoolRounds
    sampler: MatesSampler
    hook: MatesHook


def build_selection(
    sel: SelectionConfig,
    *,
    train_iters: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    dp_rank: int,
    dp_size: int,
    build_indexed_dataset,
    write_files: bool,
    tokenizer=None,
) -> SelectionParts:
    """Build the parts; ``build_indexed_dataset(num_samples)`` makes the GPTDataset for pool='indexed'.

    ``tokenizer`` (the pretraining tokenizer) decodes indexed candidates into text for the influence model.
    Collective when the selector is scored: the influence model's process group is created here.
    """
    n_rounds = math.ceil(train_iters / sel.select_every)
    per_round = sel.candidates_per_round(global_batch_size)
    if sel.pool == "indexed":
        from mates_megatron.pool.indexed_pool import IndexedPool

        dataset = build_indexed_dataset(n_rounds * per_round)
        pool: CandidatePool = IndexedPool(dataset, dataset.dataset_path, tokenizer=tokenizer)
        store = None
    else:
        from mates_megatron.pool.webdataset_pool import WebDatasetPool

        pool = WebDatasetPool(sel.shards, seq_length=seq_length)
        store = SelectionStore(pool.dir, sel.run_name)
    rounds = PoolRounds(pool.num_candidates, min(per_round, pool.num_candidates), seed=sel.seed)
    if rounds.num_rounds < n_rounds:
        raise PoolError(
            f"the pool has {pool.num_candidates} candidates: {rounds.num_rounds} rounds of {per_round} "
            f"(select_every x global_batch_size / selection_ratio), but {train_iters} steps need {n_rounds}; "
            "add data, raise selection_ratio, or train fewer steps"
        )
    sampler = MatesSampler(
        total_samples=train_iters * global_batch_size,
        consumed_samples=0,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        samples_per_round=sel.samples_per_round(global_batch_size),
        seed=sel.seed,
        global_batch_size=global_batch_size,
    )
    influence = None
    if sel.scored:
        from mates_megatron.influence.runner import InfluenceRunner

        influence = InfluenceRunner(sel.influence, ranks=sel.influence_ranks)
    hook = MatesHook(
        pool=pool,
        rounds=rounds,
        sampler=sampler,
        selector=sel.build_selector(),
        select_every=sel.select_every,
        seed=sel.seed,
        train_iters=train_iters,
        warmup_rounds=sel.warmup_rounds,
        probe_samples=sel.probe_samples,
        estimator=sel.estimator,
        influence=influence,
        store=store,
        write_files=write_files,
    )
    return SelectionParts(pool=pool, rounds=rounds, sampler=sampler, hook=hook)
