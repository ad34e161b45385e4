"""Evaluation sets apart from the probe reference: named JSONL sets, evaluated every ``eval_interval``.

A set is LAMBADA form (``{"context", "target"}``: the loss counts the target tokens) or plain text
(``{"text"}``: every token counts; a long text keeps its last ``seq_length + 1`` tokens), one line per
example, the two forms mixable. Lines that carry a ``"domain"`` are also scored per domain: the set logs
``eval/<name>`` (mean loss per counted token over the whole set) and ``eval/<name>/<domain>`` for each domain
(the validation loss per dataset Megatron users ask for). The probe reference (``TrainConfig.reference``)
stays what the selection probes against; the evaluation sets are what a selection's benefit is read from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mates_megatron.probe.reference import ReferenceSet, encode_examples, read_jsonl


@dataclass(frozen=True)
class EvalSet:
    """One named evaluation set, split into its domains (``""``: the lines without one)."""

    name: str
    parts: dict[str, ReferenceSet]

    def tokens_per_part(self) -> dict[str, float]:
        return {d: float(p.loss_mask.sum()) for d, p in self.parts.items()}


def load_eval_set(name: str, path: str, tokenizer, seq_length: int) -> EvalSet:
    rows = read_jsonl(path, what=f"evaluation set {name!r}")
    by_domain: dict[str, list] = {}
    for lineno, obj in rows:
        domain = obj.get("domain", "")
        if not isinstance(domain, str) or "/" in domain:
            raise ValueError(
                f"{path} line {lineno}: 'domain' must be a string without '/' (it names the logged "
                f"metric eval/{name}/<domain>), got {domain!r}"
            )
        by_domain.setdefault(domain, []).append((lineno, obj))
    parts = {d: encode_examples(r, path, tokenizer, seq_length) for d, r in sorted(by_domain.items())}
    return EvalSet(name=name, parts=parts)


def combine(eval_set: EvalSet, part_losses: dict[str, float]) -> dict[str, float]:
    """The logged losses of one evaluation: the set's (token-weighted) and one per named domain."""
    weights = eval_set.tokens_per_part()
    total = sum(weights.values())
    out = {eval_set.name: float(sum(part_losses[d] * w for d, w in weights.items()) / total)}
    for d, loss in part_losses.items():
        if d:
            out[f"{eval_set.name}/{d}"] = float(loss)
    return out


def check_names(names) -> None:
    for name in names:
        if not name or "/" in name or name == "reference":
            raise ValueError(
                f"TrainConfig.eval_sets name {name!r}: use a non-empty name without '/' other than "
                "'reference' (the probe reference is logged as eval/reference_loss)"
            )


class EvalSets:
    """The run's evaluation sets as this data-parallel rank's micro-batches, per set and domain."""

    def __init__(self, sets: list[EvalSet], micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        self.sets = sets
        # Each part runs as its own schedule, so a small domain gets smaller micro-batches instead of padding.
        self.batches = {
            s.name: {
                d: part.micro_batches(
                    min(micro_batch_size, -(-len(part) // dp_size)), dp_rank=dp_rank, dp_size=dp_size
                )
                for d, part in s.parts.items()
            }
            for s in sets
        }

    @classmethod
    def load(cls, cfg, default_tokenizer: str, micro_batch_size: int, dp_rank: int, dp_size: int) -> EvalSets:
        """``cfg.eval_sets`` (a TrainConfig) tokenised with its tokenizer (default: the data's)."""
        sets = []
        if cfg.eval_sets:
            from mates_megatron.data.tokenizer import load_tokenizer

            tok = load_tokenizer(cfg.tokenizer or default_tokenizer)
            sets = [
                load_eval_set(name, path, tok, cfg.model.seq_length)
                for name, path in sorted(cfg.eval_sets.items())
            ]
        return cls(sets, micro_batch_size, dp_rank, dp_size)

    def __bool__(self) -> bool:
        return bool(self.sets)

    def losses(self, evaluate: Callable[[list], float]) -> dict[str, float]:
        """``eval/`` keys -> loss, with ``evaluate(micro_batches)`` the host's mean loss per counted token."""
        out: dict[str, float] = {}
        for s in self.sets:
            out.update(combine(s, {d: evaluate(b) for d, b in self.batches[s.name].items()}))
        return out
