"""Gathering the embedded corpus's text from what the machine carries: the Python standard library (parsed
with ``ast``, never imported), and the license texts and READMEs of the distributions in the dependency
closure of mates-megatron's core requirements (so installing extras or other packages does not change the
corpus). Documents are kept with their source (the stdlib file or the distribution) so that the splits in
``embedded.py`` can hold whole sources out. The junk domain is generated here too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import platform
import random
import re
import string
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from mates_megatron.progress import progress as progress_bar

if TYPE_CHECKING:
    from mates_lab.data.embedded_config import EmbeddedCorpusConfig

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "__pycache__",
}
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING")
_ROOT_DISTRIBUTION = "mates-megatron"
_PYTHON_SOURCE = "python"
"""Source of Python's own LICENSE.txt in the licenses domain."""


class EmbeddedCorpusError(RuntimeError):
    """The machine lacks the files a domain of the embedded corpus is gathered from."""


# ----------------------------------------------------------------------------------------------- chunking

Doc = tuple[str, str]
"""(source, text): the stdlib file or the distribution a document was cut from, and the document."""


def _chunks(pieces: Iterable[str], lo: int, hi: int) -> Iterator[str]:
    """Merge consecutive pieces into docs of ``lo..hi`` characters; split overlong pieces at line breaks.

    A trailing remainder shorter than ``lo`` is dropped (it would be a fragment, not a document).
    """
    buf = ""
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        while len(piece) > hi:
            if len(buf) >= lo:
                yield buf
            buf = ""
            cut = piece.rfind("\n", lo, hi)
            if cut <= 0:
                cut = piece.rfind(" ", lo, hi)
            cut = cut if cut > 0 else hi
            head, piece = piece[:cut].strip(), piece[cut:].strip()
            if len(head) >= lo:
                yield head
        if buf and len(buf) + 2 + len(piece) > hi:
            if len(buf) >= lo:
                yield buf
            buf = ""
        buf = f"{buf}\n\n{piece}" if buf else piece
    if len(buf) >= lo:
        yield buf


def _dedup(docs: Iterable[Doc]) -> list[Doc]:
    """Keep the first copy of each text (compared with whitespace collapsed), with the source it came from."""
    seen: set[str] = set()
    out = []
    for source, doc in docs:
        key = " ".join(doc.split())
        if key not in seen:
            seen.add(key)
            out.append((source, doc))
    return out


# ----------------------------------------------------------------------------------------------- sources


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def _file_docs_and_code(source: str) -> tuple[list[str], list[str]]:
    """Docstrings (module, classes, functions) in source order, and top-level def/class sources."""
    tree = ast.parse(source)
    docs: list[tuple[int, str]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 5:
            docs.append((getattr(node, "lineno", 0), doc))
        stack += [
            n
            for n in ast.iter_child_nodes(node)
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
    # ast.get_source_segment re-splits the whole file on every call (quadratic over a file's defs, 90% of
    # the build time): slice whole lines instead. Top-level defs start at column 0, so whole lines are exact.
    lines = source.splitlines()
    code = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            code.append("\n".join(lines[first - 1 : node.end_lineno]))
    return [d for _, d in sorted(docs, key=lambda x: x[0])], code


def _python_sources(cfg: EmbeddedCorpusConfig, root: Path) -> tuple[list[Doc], list[Doc], int]:
    docs: list[Doc] = []
    code: list[Doc] = []
    n_files = 0
    for path in progress_bar(_stdlib_files(root), desc="embedded: stdlib", unit="file", leave=False):
        try:
            file_docs, file_code = _file_docs_and_code(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # e.g. files written for another Python version
        n_files += 1
        source = path.relative_to(root).as_posix()
        docs += ((source, d) for d in _chunks(file_docs, cfg.min_chars, cfg.max_chars))
        code += ((source, c) for c in _chunks(file_code, cfg.min_chars, cfg.max_chars))
    return _dedup(docs), _dedup(code), n_files


def _installed(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _root_requires() -> list[str]:
    try:
        return importlib.metadata.requires(_ROOT_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedCorpusError(
            f"{_ROOT_DISTRIBUTION} is not installed (no metadata found), so the distributions the embedded "
            "corpus is gathered from are unknown: install it as the README says (`pip install -e .`)"
        ) from None


def _dependency_closure(
    requires: list[str] | None = None,
    lookup: Callable[[str], importlib.metadata.Distribution | None] = _installed,
) -> list[tuple[str, importlib.metadata.Distribution]]:
    """The installed distributions the core requirements ``requires`` (default: mates-megatron's) need.

    Walks the requirements recursively: a requirement counts when its environment marker holds with no extra
    (so ``extra == ...`` requirements of mates-megatron are skipped), or with one of the extras its requirer
    asked for (``foo[bar]`` brings foo's ``extra == "bar"`` requirements). Requirements that are not
    installed (``lookup`` returns None) or do not parse are skipped; mates-megatron itself is left out.
    Returns [(canonical name, distribution)] sorted by name.
    """
    root = canonicalize_name(_ROOT_DISTRIBUTION)
    found: dict[str, importlib.metadata.Distribution] = {}
    visited: set[tuple[str, str]] = set()
    stack: list[tuple[str, str]] = []  # (requirement, extra it is evaluated under)
    # The root's requirements count with its `lab` extra: the builder runs in the lab, and the closure stays what
    # it was when the lab's requirements were core ones (the corpus, and so every demo figure, unchanged).
    for line in _root_requires() if requires is None else requires:
        stack.append((line, "lab"))
    while stack:
        line, extra = stack.pop()
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name == root:
            continue
        for want in sorted({"", *req.extras}):
            if (name, want) in visited:
                continue
            visited.add((name, want))
            dist = found.get(name) or lookup(name)
            if dist is None:
                break
            found[name] = dist
            stack += ((r, want) for r in dist.requires or [])
    return sorted(found.items())


def _dist_dir(dist: importlib.metadata.Distribution) -> Path | None:
    """The distribution's *.dist-info (or *.egg-info) directory, where its license files are."""
    path = getattr(dist, "_path", None)  # importlib.metadata.PathDistribution keeps it there
    return Path(path) if path is not None and Path(path).is_dir() else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _licenses(
    cfg: EmbeddedCorpusConfig, dists: list[tuple[str, importlib.metadata.Distribution]]
) -> tuple[list[Doc], int]:
    files: list[tuple[str, Path]] = []
    for name, dist in progress_bar(dists, desc="embedded: licenses", unit="pkg", leave=False):
        info = _dist_dir(dist)
        if info is not None:
            files += (
                (name, p)
                for p in sorted(info.rglob("*"))
                if p.is_file() and p.name.upper().startswith(_LICENSE_PREFIXES)
            )
    py_license = _stdlib_root() / "LICENSE.txt"
    if py_license.is_file():
        files.append((_PYTHON_SOURCE, py_license))
    docs: list[Doc] = []
    for source, f in files:
        text = _read_text(f)
        if text:
            docs += ((source, d) for d in _chunks(re.split(r"\n\s*\n", text), cfg.min_chars, cfg.max_chars))
    # Many packages ship the same MIT/BSD/Apache text: keep one copy of each.
    return _dedup(docs), len(files)


def _package_docs(
    cfg: EmbeddedCorpusConfig, dists: list[tuple[str, importlib.metadata.Distribution]]
) -> tuple[list[Doc], int]:
    docs: list[Doc] = []
    n_files = 0
    for name, dist in progress_bar(dists, desc="embedded: package docs", unit="pkg", leave=False):
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
        if not text:
            continue
        n_files += 1
        _, _, body = text.partition("\n\n")  # the headers end at the first blank line
        docs += ((name, d) for d in _chunks(re.split(r"\n\s*\n", body), cfg.min_chars, cfg.max_chars))
    return _dedup(docs), n_files


def _junk(sources: list[str], n: int, rng: random.Random, cfg: EmbeddedCorpusConfig) -> list[str]:
    """Three kinds in turn: real words in random order, one short phrase repeated, character noise."""
    words = [w for doc in sources for w in doc.split()]
    alphabet = string.ascii_letters + string.punctuation + "    "
    out = []
    for i in range(n):
        length = rng.randint(cfg.min_chars, cfg.max_chars)
        kind = i % 3
        if kind == 0:
            text = ""
            while len(text) < length:
                text += " ".join(rng.choice(words) for _ in range(32)) + " "
        elif kind == 1:
            phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            text = " ".join([phrase] * (length // (len(phrase) + 1) + 1))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(length))
        text = text[:length].strip()
        out.append(text if len(text) >= cfg.min_chars else text.ljust(cfg.min_chars, "."))
    return out


# ----------------------------------------------------------------------------------------------- files


def _machine(dists: list[tuple[str, importlib.metadata.Distribution]]) -> dict:
    """What the gathered text depends on besides the config: the Python (stdlib) and the gathered distributions."""
    return {
        "python": platform.python_version(),
        "distributions": [f"{name}=={dist.version}" for name, dist in dists],
    }
