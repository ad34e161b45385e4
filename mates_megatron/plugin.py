"""The plugin's assembly for any host: pool -> rounds -> sampler -> scorer + selector -> MatesHook.

A host calls ``build_plugin`` once on every rank, serves batches through ``Plugin.sampler`` and calls
``Plugin.hook.on_step_end(host, iteration, metrics)`` after every optimizer step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mates_megatron.config import SelectionConfig
from mates_megatron.cost import Layout, RoundCost, TransformerShape, check_round_cost
from mates_megatron.hooks import MatesHook
from mates_megatron.pool import POOLS, CandidatePool, PoolError, PoolRounds
from mates_megatron.sampler import MatesSampler
from mates_megatron.scorers import SCORERS


@dataclass
class Plugin:
    pool: CandidatePool
    rounds: PoolRounds
    sampler: MatesSampler
    hook: MatesHook
    cost: RoundCost | None = None
    """The projected cost of a scored round (None: no model shape given, or a scorer without a cost model)."""


log = logging.getLogger(__name__)


def pool_num_samples(sel: SelectionConfig, *, train_iters: int, global_batch_size: int) -> int:
    """Candidates the run needs: one pool slice of select_every x global_batch_size / ratio per round."""
    return math.ceil(train_iters / sel.select_every) * sel.candidates_per_round(global_batch_size)


def build_plugin(
    sel: SelectionConfig,
    *,
    train_iters: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    dp_rank: int,
    dp_size: int,
    build_indexed_dataset=None,
    write_files: bool = False,
    tokenizer=None,
    device: torch.device | None = None,
    model_shape: TransformerShape | None = None,
    reference_rows: int = 0,
    layout: Layout | None = None,
) -> Plugin:
    """Build the parts on this rank.

    ``build_indexed_dataset(num_samples)`` gives the host's GPTDataset (pool 'indexed'); ``tokenizer`` (the
    pretraining tokenizer) decodes candidates for scorers that read text; ``write_files``: this rank writes
    the selection files beside the data; ``device``: the training device (scorers' models run there).
    ``model_shape`` (the GPT trained) and ``reference_rows`` (the probe reference set's size): the scorer's
    round is projected against training and refused above ``max_selection_cost`` before anything is built;
    ``layout``: the GPT's parallel layout and precision for that projection (default: ``dp_size`` replicas of
    one device at ``micro_batch_size``, fp32).
    Collective when the scorer creates process groups (the 'mates' influence group).
    """
    if sel.scored and SCORERS.get(sel.scorer).reads_token_ids(sel.scorer_config):
        check_same_vocabulary(tokenizer, sel.scorer_config.influence)
    cost = None
    if sel.scored and model_shape is not None:
        cost = SCORERS.get(sel.scorer).projected_cost(
            sel.scorer_config,
            sel,
            model=model_shape,
            seq_length=seq_length,
            global_batch_size=global_batch_size,
            reference_rows=reference_rows,
            layout=layout or Layout(dp=dp_size, micro_batch_size=micro_batch_size),
        )
        if cost is not None:
            if not dist.is_initialized() or dist.get_rank() == 0:
                log.info("%s", cost.summary())
            check_round_cost(cost, sel.max_selection_cost)
    n_rounds = math.ceil(train_iters / sel.select_every)
    per_round = sel.candidates_per_round(global_batch_size)
    pool = POOLS.get(sel.pool).from_config(
        sel.pool_config,
        num_samples=n_rounds * per_round,
        seq_length=seq_length,
        build_indexed_dataset=build_indexed_dataset,
        tokenizer=tokenizer,
    )
    rounds = PoolRounds(len(pool), min(per_round, len(pool)), seed=sel.seed)
    if rounds.num_rounds < n_rounds:
        raise PoolError(
            f"the pool has {len(pool)} candidates: {rounds.num_rounds} rounds of {per_round} "
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
    scorer = None
    if sel.scored:
        scorer = sel.build_scorer(device=device, pool=pool)
    hook = MatesHook(
        pool=pool,
        rounds=rounds,
        sampler=sampler,
        selector=sel.build_selector(pool=pool),
        select_every=sel.select_every,
        seed=sel.seed,
        train_iters=train_iters,
        scorer=scorer,
        warmup_rounds=sel.warmup_rounds,
        store=pool.selection_store(sel.run_name) if write_files else None,
        state_rank=sel.state_rank,
        probe_lead_steps=sel.probe_lead_steps,
        filters=sel.build_filters(device=device, pool=pool) if sel.scored else (),
    )
    return Plugin(pool=pool, rounds=rounds, sampler=sampler, hook=hook, cost=cost)


def _vocabulary(tok) -> dict[str, int] | None:
    if tok is None:
        return None
    if hasattr(tok, "get_vocab"):  # transformers
        return dict(tok.get_vocab())
    vocab = getattr(tok, "vocab", None)  # Megatron-LM's tokenizers (MegatronTextTokenizer passes it on)
    return dict(vocab) if vocab is not None else None


def check_same_vocabulary(tokenizer, influence) -> None:
    """Refuse ``influence.pass_token_ids`` unless the pretraining tokenizer's vocabulary is the encoder's:
    otherwise the encoder would read ids that mean other tokens."""
    from mates_megatron.data.tokenizer import load_tokenizer

    mine = _vocabulary(tokenizer)
    if mine is None:
        raise ValueError(
            "influence.pass_token_ids: the pretraining tokenizer is needed to check that its vocabulary is the "
            "influence encoder's, and the host gave none (or one without a vocabulary); set "
            "influence.pass_token_ids: false"
        )
    encoder = _vocabulary(load_tokenizer(influence.resolved_path()))
    if mine != encoder:
        differ = len(set(mine.items()) ^ set(encoder.items()))
        raise ValueError(
            f"influence.pass_token_ids: the pool's tokenizer ({len(mine)} tokens) is not the influence encoder's "
            f"({len(encoder)} tokens at {influence.resolved_path()}; {differ} entries differ), so its ids mean "
            "other tokens there; set influence.pass_token_ids: false (candidates are then decoded to text)"
        )
