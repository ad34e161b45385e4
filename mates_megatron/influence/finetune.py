"""Influence model 'finetune': the encoder and a linear head trained end to end on the probes (the paper).

Data parallel over the influence group: each member takes its share of every batch, gradients are averaged
over the group; prediction reads and encodes only this member's contiguous block of the texts and gathers the
float32 scores in input order.
With ``group=None`` everything runs in this process. With ``warm_start`` a fit continues from the previous
one; without, from the pretrained encoder and a zero head, as the reference implementation does every round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence.base import (
    FitResult,
    InfluenceModel,
    check_pairs,
    gather_rows,
    rank_size,
    shard,
)
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.encoder import EncoderRegressor
from mates_megatron.influence.loader import batches as read_batches
from mates_megatron.influence.loader import spans
from mates_megatron.influence.registry import INFLUENCE_MODELS
from mates_megatron.progress import progress as progress_bar
from mates_megatron.stats import pearson, spearman

MIN_HELDOUT = 3
"""Fewest held-out pairs (and fewest training pairs) of a split: a rank correlation of 2 is always +-1."""


@INFLUENCE_MODELS.register("finetune")
class FinetuneInfluenceModel(InfluenceModel):
    """See ``InfluenceModel``; the state is the whole network (encoder and head)."""

    name = "finetune"

    def __init__(self, cfg: InfluenceConfig, *, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        self.net: EncoderRegressor | None = None
        """The network: None until the first fit or load_state_dict."""

    def _fresh(self) -> EncoderRegressor:
        torch.manual_seed(self.cfg.seed)
        return EncoderRegressor(self.cfg).to(self.device)

    def fit(self, texts: list[str], scores: np.ndarray, *, group=None, device_group=None) -> FitResult:
        if self.net is None or not self.cfg.warm_start:
            self.net = self._fresh()
        return fit(self.net, texts, scores, group=group, device_group=device_group)

    def predict(self, texts: Sequence[str], *, group=None) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("the influence model has not been fitted: call fit or load_state_dict first")
        return predict(self.net, texts, group=group, batch_size=self.cfg.predict_batch_size)

    def state_dict(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.net = self._fresh()
            self.net.load_state_dict(state)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) positions: round(n * val_fraction) held out, clamped to
    [MIN_HELDOUT, n - MIN_HELDOUT]."""
    if n < 2 * MIN_HELDOUT:
        raise ValueError(f"a train/held-out split needs at least {2 * MIN_HELDOUT} pairs, got {n}")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = min(max(MIN_HELDOUT, int(round(n * val_fraction))), n - MIN_HELDOUT)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _show(group) -> bool:
    return rank_size(group)[0] == 0


def _allreduce_mean_grads(model: torch.nn.Module, group, device_group=None) -> None:
    """Average the gradients over the group in one collective: on ``device_group`` where the gradients are
    (NCCL on CUDA, no copy through host memory) when one is given, else on ``group`` staged through CPU
    (gloo)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if device_group is None:
        flat = flat.cpu()
    dist.all_reduce(flat, group=device_group if device_group is not None else group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _better(sp: float, kept: float | None) -> bool:
    """Whether an epoch's held-out Spearman replaces the kept one: a defined value beats NaN, a larger beats a
    smaller; when no epoch has a defined value the last is kept."""
    return kept is None or math.isnan(kept) or (not math.isnan(sp) and sp > kept)


def fit(
    net: EncoderRegressor, texts: list[str], scores: np.ndarray, *, group=None, device_group=None
) -> FitResult:
    """MSE on z-scored scores; keeps the epoch with the best held-out Spearman. Collective over ``group``;
    the gradients are averaged on ``device_group`` when one is given (``InfluenceModel.fit``)."""
    cfg, ft, device = net.cfg, net.cfg.finetune, net.device
    scores = check_pairs(len(texts), scores, "fit")
    train_idx, val_idx = split(len(texts), ft.val_fraction, cfg.seed)
    mu, sd = scores[train_idx].mean(), scores[train_idx].std() or 1.0
    target = torch.tensor((scores - mu) / sd, dtype=torch.float32, device=device)
    rank, size = rank_size(group)
    opt = torch.optim.AdamW(
        [
            {"params": net.encoder.parameters(), "lr": ft.lr},
            {"params": net.head.parameters(), "lr": ft.head_lr},
        ]
    )
    best_sp, best_pe, best_epoch, best_state = None, math.nan, -1, None
    history = []
    steps = math.ceil(len(train_idx) / ft.batch_size)
    for epoch in range(ft.epochs):
        net.train()
        order = train_idx[np.random.default_rng([cfg.seed, epoch]).permutation(len(train_idx))]
        batches = [order[s * ft.batch_size : (s + 1) * ft.batch_size] for s in range(steps)]
        encoded = read_batches(
            texts, [b[rank::size] for b in batches], net.chunker.encode, workers=cfg.loader_workers,
            device=device, timeout_s=cfg.timeout_s,
        )  # fmt: skip
        for batch, inputs in progress_bar(
            zip(batches, encoded, strict=True),
            total=steps,
            desc=f"influence fit epoch {epoch + 1}",
            leave=False,
            disable=not _show(group),
        ):
            opt.zero_grad()
            if inputs is not None:
                pred = net(inputs.input_ids, inputs.attention_mask, inputs.keep)
                # Sum over my share / the whole batch: the group average is the batch's mean loss.
                loss = torch.sum((pred - target[batch[rank::size]]) ** 2) / len(batch) * size
                loss.backward()
            else:  # an empty share still joins the all-reduce with zero gradients
                for p in net.parameters():
                    p.grad = torch.zeros_like(p)
            _allreduce_mean_grads(net, group, device_group)
            opt.step()
        pred_val = predict(
            net, [texts[i] for i in val_idx], group=group, batch_size=cfg.predict_batch_size, progress=False
        )
        sp, pe = spearman(pred_val, scores[val_idx]), pearson(pred_val, scores[val_idx])
        history.append({"epoch": epoch, "spearman": sp, "pearson": pe})
        if _better(sp, best_sp):
            best_sp, best_pe, best_epoch = sp, pe, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return FitResult(spearman=best_sp, pearson=best_pe, best=best_epoch, history=history)


@torch.no_grad()
def predict(
    net: EncoderRegressor, texts: Sequence[str], *, group=None, batch_size: int = 256, progress: bool = True
) -> np.ndarray:
    """Predicted (z-scored) influence of every text, in input order, on every member of ``group``: this
    member reads and encodes only its contiguous shard of ``texts`` (read and tokenised by
    ``cfg.loader_workers`` loader workers), keeps the scores on the device until its shard is done, and the
    float32 scores are gathered."""
    net.eval()
    lo, hi, per = shard(len(texts), group)
    out = torch.zeros(per, dtype=torch.float32, device=net.device)
    parts = spans(lo, hi, batch_size)
    encoded = read_batches(
        texts, parts, net.chunker.encode, workers=net.cfg.loader_workers, device=net.device,
        timeout_s=net.cfg.timeout_s,
    )  # fmt: skip
    show = progress and _show(group)
    for part, inputs in progress_bar(
        zip(parts, encoded, strict=True),
        total=len(parts),
        desc="influence predict",
        leave=False,
        disable=not show,
    ):
        out[part.start - lo : part.stop - lo] = net(
            inputs.input_ids, inputs.attention_mask, inputs.keep
        ).float()
    return gather_rows(out.cpu(), len(texts), group).astype(np.float64)
