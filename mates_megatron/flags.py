"""Command-line flags generated from config dataclasses, for any argparse parser (Megatron-LM's included).

``dataclass_flags``: one ``--prefix-field`` per field, nested dataclasses as ``--prefix-section-field``, each with
the field's docstring as help; ``add_flags`` adds them to a parser or argument group with default None (not
given), so that Megatron-LM's own parser can carry them (``extra_args_provider``). Their values are strings;
``overrides_from_args`` turns the given ones into a nested mapping that goes through ``configio.build`` like
YAML does: one coercion, one validation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mates_megatron.configio import dataclass_of, field_types, set_path

_SCALARS = (int, float, str, bool)


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
    kind, nargs, choices = _unpack(field_types(cls)[name], f"{cls.__name__}.{name}")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = None if default is dataclasses.MISSING else default
    return Flag(flag, path, kind, nargs, default, _field_docs(cls).get(name, ""), choices)


def dataclass_flags(cls, prefix: str, *, path: str = "", exclude: Sequence[str] = ()) -> list[Flag]:
    """One flag per field of ``cls``: ``{prefix}{field}``, nested dataclasses as ``{prefix}{section}-{field}``.

    ``path`` prefixes the dotted paths (e.g. ``selection.`` when ``cls`` is a section of a larger config);
    ``exclude`` names fields (of ``cls`` itself) that get no flag.
    """
    hints = field_types(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        spelled = f"{prefix}{f.name.replace('_', '-')}"
        sub = dataclass_of(hints[f.name])
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
            owner = dataclass_of(field_types(owner)[s])
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
