"""Domain-weight files: what the mixture selector serves, written beside the data by `mates-megatron mixture`.

A file holds a schedule: each entry's weights apply from its ``from_round`` until the next entry's::

    {"format": "mates-mixture/1",
     "schedule": [{"from_round": 0, "weights": {"python_docs": 0.4, "python_code": 0.3, ...}},
                  {"from_round": 12, "weights": {...}}],
     "source": {"method": "ddo", "budget_tokens": ..., "amounts": {...}}}

Changing the weights of a running job means appending an entry whose ``from_round`` is a round not yet drawn:
the rounds already served keep theirs, so a run resumed from any checkpoint draws what the uninterrupted run
drew. ``{"weights": {...}}`` alone is a one-entry schedule from round 0. Weights are relative (normalised
when read), finite and non-negative; every domain of the pool must be named (0 to leave one out).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mates_megatron.files import atomic_write_json

FORMAT = "mates-mixture/1"


class MixtureError(ValueError):
    """A bad weights file or mixture input; the message names the file and the fix."""


@dataclass(frozen=True)
class WeightSchedule:
    """Normalised domain weights by round: ``entries`` is ``[(from_round, {domain: weight})]``, sorted."""

    entries: list[tuple[int, dict[str, float]]]
    source: dict[str, Any] = field(default_factory=dict)

    def at(self, round_: int) -> dict[str, float]:
        current = self.entries[0][1]
        for start, weights in self.entries:
            if start > round_:
                break
            current = weights
        return current

    @property
    def domains(self) -> list[str]:
        return list(self.entries[0][1])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schedule": [{"from_round": r, "weights": w} for r, w in self.entries],
            "source": self.source,
        }


def normalise(weights: dict[str, float], where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise MixtureError(f"{where}: 'weights' must be a non-empty mapping of domain name to weight")
    bad = {
        d: w for d, w in weights.items() if not isinstance(w, int | float) or not math.isfinite(w) or w < 0
    }
    if bad:
        raise MixtureError(f"{where}: weights must be finite and >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise MixtureError(f"{where}: the weights sum to 0; give at least one domain a positive weight")
    return {d: float(w) / total for d, w in weights.items()}


def parse_schedule(data: dict[str, Any], where: str) -> WeightSchedule:
    if "schedule" in data:
        raw = data["schedule"]
        if not isinstance(raw, list) or not raw:
            raise MixtureError(f"{where}: 'schedule' must be a non-empty list of {{from_round, weights}}")
    elif "weights" in data:
        raw = [{"from_round": 0, "weights": data["weights"]}]
    else:
        raise MixtureError(f"{where}: expected a 'schedule' list or a 'weights' mapping")
    entries: list[tuple[int, dict[str, float]]] = []
    for i, e in enumerate(raw):
        r = e.get("from_round") if isinstance(e, dict) else None
        if not isinstance(r, int) or r < 0:
            raise MixtureError(f"{where}: schedule[{i}].from_round must be an integer >= 0, got {r!r}")
        if entries and r <= entries[-1][0]:
            raise MixtureError(f"{where}: schedule[{i}].from_round={r} must be after {entries[-1][0]}")
        entries.append((r, normalise(e.get("weights"), f"{where} schedule[{i}]")))
    if entries[0][0] != 0:
        raise MixtureError(f"{where}: the first schedule entry must start at round 0, not {entries[0][0]}")
    names = set(entries[0][1])
    for r, w in entries[1:]:
        if set(w) != names:
            raise MixtureError(
                f"{where}: the entry from round {r} names domains {sorted(w)}, the first {sorted(names)}; "
                "name the same domains in every entry"
            )
    return WeightSchedule(entries, dict(data.get("source", {})))


def read_weights(path: str | Path) -> WeightSchedule:
    p = Path(path)
    if not p.is_file():
        raise MixtureError(
            f"mixture weights {p}: no such file; write one with `mates-megatron mixture fit|predict` or by hand "
            '({"weights": {"<domain>": <weight>, ...}})'
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MixtureError(f"mixture weights {p}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise MixtureError(f"mixture weights {p}: expected a JSON object")
    return parse_schedule(data, f"mixture weights {p}")


def write_weights(path: str | Path, schedule: WeightSchedule) -> Path:
    """Atomic: a running job reading the file between rounds never sees half of it."""
    return atomic_write_json(path, schedule.to_json())


def constant(weights: dict[str, float], source: dict[str, Any] | None = None) -> WeightSchedule:
    return WeightSchedule([(0, normalise(weights, "weights"))], dict(source or {}))


def cap_unrepeated(weights: dict[str, float], available: dict[str, float], total: float) -> dict[str, float]:
    """The weights with each domain capped at its unrepeated share, ``w_d * total <= available[d]``.

    DDO's and AutoScale's loss forms assume every token a domain serves is fresh; a weight above the share the
    domain can give once would repeat its data. A capped domain keeps its cap and the rest of the mass goes to
    the uncapped domains in proportion to their weights (water-filling: capping can push another domain over
    its own cap, so repeat until none is). ``available`` and ``total`` are in one unit (tokens or samples).
    """
    w = normalise(weights, "weights")
    missing = sorted(set(w) - set(available))
    if missing:
        raise MixtureError(f"unrepeated cap: no available amount for {missing}")
    if not total > 0:
        raise MixtureError(f"unrepeated cap: the budget must be positive, got {total}")
    cap = {d: max(0.0, float(available[d])) / total for d in w}
    if sum(cap[d] for d in w if w[d] > 0) < 1 - 1e-12:
        raise MixtureError(
            f"unrepeated cap: the weighted domains hold {sum(available[d] for d in w if w[d] > 0):.0f} of the "
            f"budget's {total:.0f}; no mixture of them fills it without repeating data"
        )
    fixed: dict[str, float] = {}
    while True:
        free = {d: x for d, x in w.items() if d not in fixed}
        scale = (1.0 - sum(fixed.values())) / sum(free.values())
        over = {d for d, x in free.items() if x * scale > cap[d]}
        if not over:
            return {d: fixed.get(d, w[d] * scale) for d in w}
        fixed.update({d: cap[d] for d in over})


def read_domain_tokens(prefix: str | Path) -> dict[str, float]:
    """Tokens per domain of a prepared indexed dataset (``PREFIX.meta.json`` from `mates-megatron prepare`)."""
    meta = Path(f"{prefix}.meta.json")
    if not meta.is_file():
        raise MixtureError(f"{meta}: not found; the tokens per domain come from `mates-megatron prepare`")
    tokens = json.loads(meta.read_text()).get("tokens_per_domain")
    if not tokens:
        raise MixtureError(f"{meta}: no tokens_per_domain; prepare the data again to count them")
    return {d: float(n) for d, n in tokens.items()}
