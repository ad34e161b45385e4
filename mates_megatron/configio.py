"""One config path: YAML mappings and command-line flags become typed config dataclasses the same way.

``build(cls, data, where=...)`` turns a nested mapping (a YAML file, flag overrides merged into it) into the
dataclass through pydantic's ``TypeAdapter``: it coerces what YAML 1.1 and argparse hand over as strings
('1e-3' -> 0.001, '5' -> 5), refuses what would lose information (1.5 for an int), runs every
``__post_init__`` and reports its ValueError with the field path. A config class may rewrite earlier spellings
of its mapping first (``normalize``). Pydantic ignores unknown keys on stdlib
dataclasses (and ``TypeAdapter(config=...)`` is refused for them), so unknown keys are checked here first.

Command-line flags are generated from the same dataclasses (``mates_megatron.flags``); their string values
go through ``build`` like YAML does: one coercion, one validation.

Why not jsonargparse or tyro: both parse into their own parser (jsonargparse's ``ArgumentParser`` subclass,
tyro's generated one), while Megatron-LM builds a stdlib ``argparse.ArgumentParser`` and only lets a plugin
add arguments to it; pydantic (already a dependency) does the coercion and validation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

T = TypeVar("T")

_SCALARS = (int, float, str, bool)


# -- building ---------------------------------------------------------------------------------------------


@functools.cache
def _adapter(cls) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def build(
    cls: type[T], data: Mapping[str, Any], *, where: str, sources: Mapping[str, str] | None = None
) -> T:
    """The dataclass ``cls`` of a nested mapping; ValueError naming ``where``, the field, value and reason.

    ``sources`` maps dotted field paths to where their value came from (e.g. the flag that sets it); it is
    added to the message of an error on that field.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {_short(data)}")
    data = normalize(cls, data, where=where)
    check_keys(cls, data, where=where)
    check_sections(cls, data, where=where, sources=sources or {})
    try:
        return _adapter(cls).validate_python(dict(data))
    except pydantic.ValidationError as e:
        raise ValueError(_explain(cls, data, e, where=where, sources=sources or {})) from None
    except TypeError as e:  # a __post_init__ that raises TypeError is not wrapped by pydantic
        raise ValueError(f"{where}: {cls.__name__}: {e}") from e


def normalize(cls, data: Mapping[str, Any], *, where: str, path: str = "") -> dict[str, Any]:
    """``data`` in today's spelling: each dataclass on the path that defines a ``normalize_mapping``
    classmethod (earlier releases' keys, section spellings) rewrites its own mapping. Idempotent, so a file
    can be normalised before flags are merged over it (a flag then overrides the file's new key)."""
    hook = getattr(cls, "normalize_mapping", None)
    out = dict(hook(data, where=where, path=path) if hook is not None else data)
    hints = field_types(cls)
    for key, value in out.items():
        sub = dataclass_of(hints[key]) if key in hints else None
        if sub is not None and isinstance(value, Mapping):
            out[key] = normalize(sub, value, where=where, path=f"{path}{key}.")
    return out


def check_sections(
    cls, data: Mapping[str, Any], *, where: str, sources: Mapping[str, str], path: str = ""
) -> None:
    """Validate the option mappings whose dataclass depends on another field (a component's ``*_options``,
    whose class its ``kind`` names) before the whole config, so that an error names the option's own path
    and the flag that set it. A dataclass declares them with ``option_sections(data) -> {field: cls}``."""
    hook = getattr(cls, "option_sections", None)
    sections = hook(data) if hook is not None else {}
    hints = field_types(cls)
    for key, value in data.items():
        if not isinstance(value, Mapping):
            continue
        sub = sections.get(key) or (dataclass_of(hints[key]) if key in hints else None)
        if sub is None:
            continue
        if key in sections:
            prefix = f"{path}{key}."
            own = {k[len(prefix) :]: v for k, v in sources.items() if k.startswith(prefix)}
            build(sub, value, where=where, sources=own)
        else:
            check_sections(sub, value, where=where, sources=sources, path=f"{path}{key}.")


def check_keys(cls, data: Mapping[str, Any], *, where: str, path: str = "") -> None:
    """Refuse keys that are no field of ``cls`` (recursively into nested dataclass sections)."""
    hints = field_types(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in data.items():
        dotted = f"{path}{key}"
        if key not in known:
            raise ValueError(f"{where}: unknown field {dotted!r}; {cls.__name__} has: {', '.join(known)}")
        sub = dataclass_of(hints[key])
        if sub is not None and isinstance(value, Mapping):
            check_keys(sub, value, where=where, path=f"{dotted}.")


def _explain(cls, data: Mapping, error: pydantic.ValidationError, *, where: str, sources) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc)
        reason = err["msg"].removeprefix("Value error, ")
        owner = _type_at(cls, loc)
        if err["type"] == "value_error" and owner is not None:
            # A __post_init__ refusal: pydantic places it on the dataclass; name the fields it mentions.
            blamed = [
                _describe(f"{path}.{n}" if path else n, _value_at(data, (*loc, n)), sources)
                for n in _mentioned(owner, reason)
            ]
            lines.append(f"{', '.join(blamed) or path or owner.__name__}: {reason}")
        elif err["type"] == "missing":
            lines.append(f"{_describe(path, _MISSING, sources)}: required, not given")
        else:
            lines.append(f"{_describe(path, err.get('input'), sources)}: {reason}")
    return f"{where}: " + "; ".join(lines)


_MISSING = object()
"""A field left out of the mapping (its dataclass default applies)."""


def _describe(path: str, value: Any, sources: Mapping[str, str]) -> str:
    shown = "" if value is _MISSING else f"={_short(value)}"
    return f"{path}{shown}" + (f" ({sources[path]})" if path in sources else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mentioned(cls, message: str) -> list[str]:
    """Fields of ``cls`` that a validation message names, ``Class.field`` spellings first."""
    names = [f.name for f in dataclasses.fields(cls)]
    hits = [n for n in names if re.search(rf"\b{cls.__name__}\.{n}\b", message)]
    return hits or [n for n in names if re.search(rf"(?<![\w.-]){n}\b", message)]


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        found = (isinstance(data, Mapping) and part in data) or (
            isinstance(data, list | tuple) and isinstance(part, int) and part < len(data)
        )
        if not found:
            return _MISSING
        data = data[part]
    return data


def _type_at(cls, loc: tuple):
    """The dataclass at field path ``loc`` of ``cls`` (None where the path leaves dataclasses)."""
    for part in loc:
        if not isinstance(part, str) or cls is None:
            return None
        hints = field_types(cls)
        if part not in hints:
            return None
        cls = dataclass_of(hints[part])
    return cls


@functools.cache
def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dataclass_of(tp):
    """The dataclass type of an annotation (``X`` or ``X | None``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


# -- YAML -------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path, *, section: str | None = None, where: str | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping; with ``section``, that key's mapping if the file has it.

    (``--mates-config`` accepts a bare SelectionConfig mapping or a whole run config's ``selection:``.)
    """
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    if section is not None and section in data:
        data = data[section] or {}
        if not isinstance(data, dict):
            raise ValueError(f"{where}: {section!r} must be a mapping")
    return dict(data)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    *sections, name = dotted.split(".")
    for s in sections:
        data = data.setdefault(s, {})
    data[name] = value
