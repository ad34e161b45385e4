"""The paper rounds projected by the corrected cost model (``mates_megatron.cost``): seconds on one rank of an
8-GPU H100 node (the ``h100`` preset: public figures, not measured here) against the round's training seconds.

The run is ``examples/megatron_lm/pretrain_gpt_mates.sh``'s: Pythia shapes (untied embeddings, rotary positions),
1,024-token rows, global batch 512 over 8 data-parallel replicas at micro-batch 16, bf16 with fp32 main weights,
a round every 10k steps, 25.6M candidates, 80k probes against LAMBADA's 5,153 examples. Each case is projected
under DDP (the script) and under the distributed optimizer (Bridge recipes' default), with reference rows padded
to 1,024 tokens (today) and packed (at an assumed 100 GPT-NeoX tokens per LAMBADA example), for MiniLM (the
embedded default) and bert-base, and once more with the host's decode and tokenisation taken off the critical
path (what moving them into loader workers would leave).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BERT_BASE = (12, 768, 3072, 30522)
"""bert-base-uncased's layers, hidden, FFN and vocab (its config.json): no weights are needed to count."""
LAMBADA_ROWS = 5153
LAMBADA_TOKENS_PER_ROW = 100
"""Assumed mean GPT-NeoX tokens of a LAMBADA example (passage and target word), for the packed reference."""
OPUS_FRACTION = 0.047
"""The best published online selector's reported extra compute (OPUS), the bar the paper round is held to."""


def _gpts():
    from mates_megatron.cost import TransformerShape

    return {
        "paper_410m": TransformerShape(24, 1024, 4096, 50304, num_attention_heads=16, tied_embeddings=False),
        "paper_1b": TransformerShape(16, 2048, 8192, 50304, num_attention_heads=8, tied_embeddings=False),
    }


def _case(cost) -> dict:
    top, part = cost.dominant()
    t = cost.training_seconds
    return {
        "fraction": round(cost.fraction, 4),
        "under_opus_4.7%": cost.fraction < OPUS_FRACTION,
        "dominant": f"{top}.{part}",
        "phases": {k: round(v / t, 5) for k, v in cost.phase_seconds.items()},
        "parts_seconds": {k: {p: round(s, 2) for p, s in v.items()} for k, v in cost.seconds.items()},
        "training_seconds": round(t, 1),
        "flop_fraction": round(cost.flop_fraction, 5),
        "probes_per_rank": cost.counts["probes_per_rank"],
    }


def paper_cost(estimators: tuple[str, ...] = ("forward", "linearized", "oracle")) -> dict:
    """Every case (see the module doc) and, per paper config, a plain verdict for its best setting."""
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import build, load_yaml
    from mates_megatron.cost import MACHINES, Layout, TransformerShape, project_mates_round
    from mates_megatron.influence.config import InfluenceConfig

    minilm = TransformerShape.from_encoder_dir(InfluenceConfig().resolved_path())
    encoders = {"minilm": minilm, "bert_base": TransformerShape(*BERT_BASE, num_attention_heads=12)}
    out: dict = {"machine": MACHINES["h100"].to_dict()}
    for name, gpt in _gpts().items():
        sel = build(SelectionConfig, load_yaml(CONFIGS / f"{name}.yaml")["selection"], where=name)
        cases = {}
        for est in estimators:
            for enc_name, enc in encoders.items():
                for dopt in (False, True):
                    for packed in (False, True):
                        for host in ("host", "no_host"):
                            mates = sel.scorer_config
                            inf = dataclasses.replace(mates.influence, pass_token_ids=host == "no_host")
                            cost = project_mates_round(
                                sel, dataclasses.replace(mates, estimator=est, influence=inf), model=gpt,
                                seq_length=1024, global_batch_size=512, reference_rows=LAMBADA_ROWS,
                                encoder=enc, machine="h100",
                                layout=Layout(dp=8, micro_batch_size=16, bf16=True, distributed_optimizer=dopt),
                                reference_tokens=LAMBADA_ROWS * LAMBADA_TOKENS_PER_ROW if packed else None,
                            )  # fmt: skip
                            key = "_".join([est, enc_name, "distopt" if dopt else "ddp",
                                            "packed" if packed else "padded", host])  # fmt: skip
                            cases[key] = _case(cost)
        out[name] = cases
        out[f"{name}_verdict"] = verdict(cases)
    out["assumptions"] = cost.assumptions
    return out


def verdict(cases: dict) -> str:
    """One sentence per estimator on the config's own settings (MiniLM, DDP, padded reference, today's host path),
    and what the best case leaves."""
    lines = []
    for est in ("forward", "linearized"):
        today = cases.get(f"{est}_minilm_ddp_padded_host")
        if today is None:
            continue
        best = cases[f"{est}_minilm_ddp_packed_no_host"]
        dist = cases[f"{est}_minilm_distopt_padded_host"]
        lines.append(
            f"{est}: {today['fraction']:.1%} of training ({'under' if today['under_opus_4.7%'] else 'not under'} "
            f"5%, OPUS 4.7%), dominated by {today['dominant']}; under the distributed optimizer "
            f"{dist['fraction']:.1%} ({dist['dominant']}); with packed reference rows and decode + tokenise off the "
            f"training process {best['fraction']:.1%} ({best['dominant']})"
        )
    return "; ".join(lines)
