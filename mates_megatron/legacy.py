"""Config spellings of earlier releases, read for one more release with a FutureWarning that names the new key.

``normalize_selection`` turns a ``selection`` mapping (YAML, or flags merged into it) into today's spelling
before it is validated (``SelectionConfig.normalize_mapping``, called by ``configio.build``):

- ``scorer: {kind: NAME, ...}`` (the section spelling) becomes ``scorer: NAME`` and ``scorer_options: {...}``;
  ``scorer_options`` given beside a section are laid over it (a flag overrides a file).
- MATES's flat keys (``probe_samples``, ``estimator``, ``probe_tokens``, ``influence``, ``influence_rounds``,
  ``min_influence_spearman``) move into ``scorer_options`` when the scorer's ``Config`` has them ('mates',
  'static'). For the encoder-based scorers ('lava', 'gotd', 'lookalike': a ``Config`` that is an
  ``EncoderConfig``) the encoder settings of a flat ``influence`` section move, as those scorers read them
  before. Any other scorer ignored them, and still does, with a warning that says so.

A key given in both spellings with different values is refused: nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

MATES_KEYS = (
    "probe_samples", "estimator", "probe_tokens", "influence", "influence_rounds", "min_influence_spearman",
)  # fmt: skip
"""SelectionConfig fields of earlier releases that are now ``MatesConfig``'s."""


def _warn(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=4)


def _scorer_class(name: Any, imports: Any):
    from mates_megatron.registry import import_modules
    from mates_megatron.scorers import SCORERS

    import_modules(list(imports or []))
    return SCORERS.get(name) if isinstance(name, str) and name in SCORERS else None


def _put(options: dict[str, Any], key: str, value: Any, *, where: str, old: str) -> None:
    if key in options and options[key] != value:
        raise ValueError(
            f"{where}: {old}={value!r} and scorer_options.{key}={options[key]!r} disagree: keep only "
            f"scorer_options.{key} ({old} is the spelling of earlier releases)"
        )
    options[key] = value


def normalize_selection(data: Mapping[str, Any], *, where: str, path: str = "") -> dict[str, Any]:
    """``data`` (a selection mapping at dotted ``path``, e.g. 'selection.') in today's spelling."""
    out = dict(data)
    section = out.get("scorer")
    if isinstance(section, Mapping):
        section = dict(section)
        if "kind" not in section:
            raise ValueError(
                f"{where}: {path}scorer is a section without 'kind': name the scorer, e.g. "
                "scorer: {kind: mates, probe_samples: 256}"
            )
        out["scorer"] = section.pop("kind")
        given = out.get("scorer_options") or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"{where}: {path}scorer_options must be a mapping, got {given!r}")
        out["scorer_options"] = {**section, **given}
    flat = [k for k in MATES_KEYS if k in out]
    if not flat:
        return out
    name = out.get("scorer", "none")
    cls = _scorer_class(name, out.get("imports"))
    config = cls.Config if cls is not None else None
    fields = {f.name for f in dataclasses.fields(config)} if config is not None else set()
    options = dict(out.get("scorer_options") or {})
    from mates_megatron.encoder import EncoderConfig
    from mates_megatron.influence.config import ENCODER_FIELDS

    for key in flat:
        value = out.pop(key)
        old = f"{path}{key}"
        if key in fields:
            _put(options, key, value, where=where, old=old)
            _warn(
                f"{where}: {old} is read for one more release: write it as {path}scorer_options.{key}, or in the "
                f"section scorer: {{kind: {name}, {key}: ...}}"
            )
        elif key == "influence" and config is not None and issubclass(config, EncoderConfig):
            moved = {k: v for k, v in (value or {}).items() if k in ENCODER_FIELDS}
            for k, v in moved.items():
                options.setdefault(k, v)  # the scorer's own setting won before too (max_length)
            _warn(
                f"{where}: {old} is read for one more release for scorer {name!r}'s encoder: write "
                f"{sorted(moved) or 'its encoder settings'} under {path}scorer_options"
            )
        else:
            _warn(
                f"{where}: {old} configures the 'mates' scorer and scorer {name!r} ignores it: remove it (with "
                f"scorer: mates, write it as {path}scorer_options.{key})"
            )
    out["scorer_options"] = options
    return out
