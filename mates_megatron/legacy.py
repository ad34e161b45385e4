"""Config spellings of earlier releases, read for one more release with a FutureWarning that names the new key.

``normalize_selection`` turns a ``selection`` mapping (YAML, or flags merged into it) into today's spelling
before it is validated (``SelectionConfig.normalize_mapping``, called by ``configio.build``):

- A component section (``pool: {kind: NAME, ...}``, ``selector: {...}``, ``scorer: {...}``) becomes the name
  and its ``*_options``; ``*_options`` given beside a section are laid over it (a flag overrides a file).
- The flat keys of earlier releases (``FLAT``: MATES's ``probe_samples``, ``estimator``, ``influence``, ...;
  ``temperature``; ``mixture_weights``; ``shards``, ``energon_*``) move into their component's options when
  the named component takes them. For the encoder-based scorers ('lava', 'gotd', 'lookalike': a ``Config``
  that is an ``EncoderConfig``) the encoder settings of a flat ``influence`` section move, as those scorers
  read them before. A component that does not take a key ignored it before, and still does, with a warning.

A key given in both spellings with different values is refused: nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from typing import Any

FLAT: dict[str, tuple[str, str]] = {
    "probe_samples": ("scorer", "probe_samples"),
    "estimator": ("scorer", "estimator"),
    "probe_tokens": ("scorer", "probe_tokens"),
    "influence": ("scorer", "influence"),
    "influence_rounds": ("scorer", "influence_rounds"),
    "min_influence_spearman": ("scorer", "min_influence_spearman"),
    "temperature": ("selector", "temperature"),
    "mixture_weights": ("selector", "weights"),
    "mixture_when_short": ("selector", "when_short"),
    "shards": ("pool", "shards"),
    "energon_split": ("pool", "split"),
    "energon_text_field": ("pool", "text_field"),
    "energon_domain_field": ("pool", "domain_field"),
}
"""SelectionConfig fields of earlier releases -> (the component kind, the option of its Config)."""


def _warn(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=4)


def _put(options: dict[str, Any], key: str, value: Any, *, where: str, old: str, new: str) -> None:
    if key in options and options[key] != value:
        raise ValueError(
            f"{where}: {old}={value!r} and {new}={options[key]!r} disagree: keep only {new} ({old} is the "
            "spelling of earlier releases)"
        )
    options[key] = value


def _unfold(out: dict[str, Any], kind: str, *, where: str, path: str) -> None:
    """``kind: {kind: NAME, ...}`` -> ``kind: NAME`` and ``kind_options`` (given options laid over it)."""
    section = out.get(kind)
    if not isinstance(section, Mapping):
        return
    section = dict(section)
    if "kind" not in section:
        raise ValueError(
            f"{where}: {path}{kind} is a section without 'kind': name the {kind}, e.g. "
            f"{kind}: {{kind: NAME, option: value}}"
        )
    out[kind] = section.pop("kind")
    given = out.get(f"{kind}_options") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"{where}: {path}{kind}_options must be a mapping, got {given!r}")
    out[f"{kind}_options"] = {**section, **given}


def normalize_selection(
    data: Mapping[str, Any],
    *,
    where: str,
    path: str = "",
    known: set[str],
    defaults: Mapping[str, str],
    registries: Mapping[str, Any],
) -> dict[str, Any]:
    """``data`` (a selection mapping at dotted ``path``, e.g. 'selection.') in today's spelling. ``known``:
    SelectionConfig's fields; ``defaults``/``registries``: each component kind's default name and registry."""
    out = dict(data)
    for kind in defaults:
        _unfold(out, kind, where=where, path=path)
    for key in out:
        near = difflib.get_close_matches(str(key), FLAT, n=1) if key not in known and key not in FLAT else []
        if near:  # a misspelt option of a built-in component: name where it lives now
            kind, option = FLAT[near[0]]
            raise ValueError(
                f"{where}: unknown field '{path}{key}': did you mean {kind}_options.{option} (in the section "
                f"{kind}: {{kind: NAME, {option}: ...}})?"
            )
    flat = [k for k in FLAT if k in out]
    if not flat:
        return out
    from mates_megatron.encoder import EncoderConfig
    from mates_megatron.influence.config import ENCODER_FIELDS
    from mates_megatron.registry import import_modules

    import_modules(list(out.get("imports") or []))
    for key in flat:
        kind, option = FLAT[key]
        value = out.pop(key)
        name = out.get(kind, defaults[kind])
        cls = registries[kind].get(name) if isinstance(name, str) and name in registries[kind] else None
        config = cls.Config if cls is not None else None
        fields = {f.name for f in dataclasses.fields(config)} if config is not None else set()
        options = dict(out.get(f"{kind}_options") or {})
        old, new = f"{path}{key}", f"{path}{kind}_options.{option}"
        if option in fields:
            _put(options, option, value, where=where, old=old, new=new)
            _warn(
                f"{where}: {old} is read for one more release: write it as {new}, or in the section "
                f"{kind}: {{kind: {name}, {option}: ...}}"
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
                f"{where}: {old} is an option that {kind} {name!r} does not take, and it was ignored: remove "
                f"it (where a {kind} takes it, write it as {new})"
            )
        out[f"{kind}_options"] = options
    return out
