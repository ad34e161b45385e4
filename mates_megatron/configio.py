"""One config path: YAML mappings and command-line flags become typed config dataclasses the same way.

``build(cls, data, where=...)`` turns a nested mapping (a YAML file, flag overrides merged into it) into the
dataclass through pydantic's ``TypeAdapter``: it coerces what YAML 1.1 and argparse hand over as strings
('1e-3' -> 0.001, '5' -> 5), refuses what would lose information (1.5 for an int), runs every
``__post_init__`` and reports its ValueError with the field path. Pydantic ignores unknown keys on stdlib
dataclasses (and ``TypeAdapter(config=...)`` is refused for them), so unknown keys are checked here first.

Flags are generated from the same dataclasses (``dataclass_flags``: one ``--prefix-field`` per field, nested
dataclasses as ``--prefix-section-field``, each with the field's docstring as help) and added to any argparse
parser or group with default None (``add_flags``), so that Megatron-LM's own parser can carry them
(``extra_args_provider``). Their values are strings; ``overrides_from_args`` turns the given ones into a
nested mapping that goes through ``build`` like YAML does: one coercion, one validation.

Why not jsonargparse or tyro: both parse into their own parser (jsonargparse's ``ArgumentParser`` subclass,
tyro's generated one), while Megatron-LM builds a stdlib ``argparse.ArgumentParser`` and only lets a plugin
add arguments to it; pydantic (already a dependency) does the coercion and validation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
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
    check_keys(cls, data, where=where)
    try:
        return _adapter(cls).validate_python(dict(data))
    except pydantic.ValidationError as e:
        raise ValueError(_explain(cls, data, e, where=where, sources=sources or {})) from None
    except TypeError as e:  # a __post_init__ that raises TypeError is not wrapped by pydantic
        raise ValueError(f"{where}: {cls.__name__}: {e}") from e


def check_keys(cls, data: Mapping[str, Any], *, where: str, path: str = "") -> None:
    """Refuse keys that are no field of ``cls`` (recursively into nested dataclass sections)."""
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in data.items():
        dotted = f"{path}{key}"
        if key not in known:
            raise ValueError(f"{where}: unknown field {dotted!r}; {cls.__name__} has: {', '.join(known)}")
        sub = _dataclass_of(hints[key])
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
        hints = _hints(cls)
        if part not in hints:
            return None
        cls = _dataclass_of(hints[part])
    return cls


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp):
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


# -- flags ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets."""

    flag: str
    """Command-line spelling, e.g. ``--mates-select-every``."""
    path: str
    """Dotted field path in the config mapping, e.g. ``influence.lr`` or ``model.num_layers``."""
    kind: type
    """Item type: int, float, str, bool, or dict (a JSON/YAML mapping given as one string)."""
    nargs: str | None
    """'+' for list/tuple fields, else None."""
    default: Any
    """The dataclass default (shown in --help)."""
    doc: str
    """The field's docstring (--help)."""
    choices: tuple | None = None
    """Allowed values of a Literal field."""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def field_docs(cls) -> dict[str, str]:
    """Docstrings under dataclass fields (Python keeps none at run time, so read them from the source)."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unpack(tp, where: str) -> tuple[type, str | None, tuple | None]:
    """(item kind, nargs, choices) of a field annotation such as ``list[int] | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{where}: no flag for the union type {tp}")
        tp = members[0]
    origin = typing.get_origin(tp)
    if tp is dict or origin in (dict, Mapping):
        return dict, None, None
    nargs = None
    if tp in (list, tuple) or origin in (list, tuple, Sequence):
        nargs = "+"
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(set(args)) > 1:
            raise TypeError(f"{where}: no flag for the mixed sequence type {tp}")
        tp = args[0] if args else str
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), nargs, choices
    if tp not in _SCALARS:
        raise TypeError(f"{where}: no flag for the field type {tp}")
    return tp, nargs, None


def _flag_of(cls, name: str, flag: str, path: str) -> Flag:
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise TypeError(f"{cls.__name__} has no field {name!r} (flag {flag})")
    kind, nargs, choices = _unpack(_hints(cls)[name], f"{cls.__name__}.{name}")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = None if default is dataclasses.MISSING else default
    return Flag(flag, path, kind, nargs, default, _field_docs(cls).get(name, ""), choices)


def dataclass_flags(cls, prefix: str, *, path: str = "", exclude: Sequence[str] = ()) -> list[Flag]:
    """One flag per field of ``cls``: ``{prefix}{field}``, nested dataclasses as ``{prefix}{section}-{field}``.

    ``path`` prefixes the dotted paths (e.g. ``selection.`` when ``cls`` is a section of a larger config);
    ``exclude`` names fields (of ``cls`` itself) that get no flag.
    """
    hints = _hints(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        spelled = f"{prefix}{f.name.replace('_', '-')}"
        sub = _dataclass_of(hints[f.name])
        if sub is not None:
            out += dataclass_flags(sub, f"{spelled}-", path=f"{path}{f.name}.")
        else:
            out.append(_flag_of(cls, f.name, spelled, f"{path}{f.name}"))
    return out


def named_flags(cls, table: Mapping[str, str]) -> list[Flag]:
    """Flags with chosen spellings (e.g. Megatron-LM's ``--num-layers``) for dotted field paths of ``cls``."""
    out = []
    for flag, dotted in table.items():
        owner, *sections, name = [cls, *dotted.split(".")]
        for s in sections:
            owner = _dataclass_of(_hints(owner)[s])
        out.append(_flag_of(owner, name, flag, dotted))
    return out


def add_flags(parser, flags: Sequence[Flag]) -> list[Flag]:
    """Add ``flags`` to an argparse parser or argument group, each with default None (not given).

    Values stay strings: ``build`` coerces and validates them with the rest of the config. A bool field gets
    ``--flag`` / ``--no-flag``; a list field takes one or more values; a dict field one JSON/YAML mapping.
    """
    seen: set[str] = set()
    for f in flags:
        if f.flag in seen:
            raise TypeError(f"two fields would share the flag {f.flag} (field {f.path}): rename one")
        seen.add(f.flag)
        shown = " ".join(map(str, f.default)) if f.nargs and f.default else f.default
        if f.kind is dict:
            shown = json.dumps(f.default)
        help_ = f"{f.doc} [default: {shown}]".replace("%", "%%").strip()
        if f.kind is bool and f.nargs is None:
            parser.add_argument(
                f.flag, dest=f.dest, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
            continue
        parser.add_argument(
            f.flag,
            dest=f.dest,
            default=None,
            nargs=f.nargs,
            choices=[str(c) for c in f.choices] if f.choices else None,
            metavar="MAPPING" if f.kind is dict else f.kind.__name__.upper(),
            help=help_,
        )
    return list(flags)


def overrides_from_args(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """The flags given on the command line as a nested mapping of dotted paths (left-out flags are absent).

    A dict field's string is read as YAML (JSON is YAML too) and must give a mapping.
    """
    out: dict[str, Any] = {}
    for f in flags:
        value = getattr(args, f.dest, None)
        if value is None:
            continue
        if f.kind is dict:
            try:
                value = yaml.safe_load(value) if isinstance(value, str) else value
            except yaml.YAMLError as e:
                raise ValueError(f"{f.flag} {value!r}: not a JSON/YAML mapping ({e})") from None
            if not isinstance(value, Mapping):
                raise ValueError(f"{f.flag} {value!r}: give a mapping, e.g. '{{\"key\": 1}}'")
        set_path(out, f.path, value)
    return out


def given_paths(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a nested mapping (a nested mapping's keys, not the mapping itself)."""
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out += given_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out
