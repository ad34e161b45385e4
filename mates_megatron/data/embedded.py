"""The embedded default corpus: real text gathered at prepare time from what the machine carries.

Nothing text-like is committed to the repository. Domains:

- python_docs:  docstrings of the Python standard library (parsed with ``ast``, never imported)
- python_code:  source of standard-library functions and classes
- licenses:     license texts of the installed packages and of Python itself (exact duplicates dropped)
- package_docs: the long descriptions (READMEs) in the installed packages' METADATA
- junk:         deliberately low quality: word-shuffled text, one phrase repeated, character noise

The reference set is LAMBADA-style (context, final word) and comes from ``reference_domain`` documents
held out of the corpus. For a given seed and set of installed files the output is byte-identical.
"""

from __future__ import annotations

import ast
import json
import platform
import random
import re
import site
import string
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

DOMAINS = ("python_docs", "python_code", "licenses", "package_docs", "junk")
REAL_DOMAINS = DOMAINS[:-1]
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


EMBEDDED_FORMAT = 1
"""Bump whenever the builder writes other files for the same config and machine: ``check_embedded_data``
refuses data of another format instead of training on a corpus this version would not build."""


class EmbeddedCorpusError(RuntimeError):
    """The machine lacks the files a domain of the embedded corpus is gathered from."""


@dataclass
class EmbeddedCorpusConfig:
    """How much of each domain to gather, and the reference set."""

    seed: int = 1234
    """Seed of every random choice (held-out reference docs, per-domain sampling, junk, corpus order)."""
    max_docs_per_domain: int = 6000
    """Cap per domain (a seeded sample when a domain has more)."""
    reference_size: int = 256
    """Reference examples (context, target), from documents held out of the corpus."""
    reference_domain: str = "python_docs"
    """Domain the reference set is drawn from (any domain but junk)."""
    min_chars: int = 200
    """Shortest document; shorter consecutive pieces of one source file are merged."""
    max_chars: int = 2000
    """Longest document; longer texts are split at paragraph or line boundaries."""

    def __post_init__(self) -> None:
        if self.reference_domain not in REAL_DOMAINS:
            raise ValueError(
                f"EmbeddedCorpusConfig.reference_domain={self.reference_domain!r}: "
                f"choose one of {REAL_DOMAINS}"
            )
        if self.max_docs_per_domain < 1:
            raise ValueError(
                f"EmbeddedCorpusConfig.max_docs_per_domain={self.max_docs_per_domain}: must be >= 1"
            )
        if self.reference_size < 1:
            raise ValueError(
                f"EmbeddedCorpusConfig.reference_size={self.reference_size}: must be >= 1 "
                "(the probe needs a reference set)"
            )
        if self.min_chars < 1:
            raise ValueError(f"EmbeddedCorpusConfig.min_chars={self.min_chars}: must be >= 1")
        if self.max_chars <= self.min_chars:
            raise ValueError(
                f"EmbeddedCorpusConfig.max_chars={self.max_chars}: must be greater than "
                f"min_chars={self.min_chars} (e.g. 10 * min_chars)"
            )


# ----------------------------------------------------------------------------------------------- chunking


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


def _dedup(docs: Iterable[str]) -> list[str]:
    """Keep the first copy of each text (compared with whitespace collapsed)."""
    seen: set[str] = set()
    out = []
    for doc in docs:
        key = " ".join(doc.split())
        if key not in seen:
            seen.add(key)
            out.append(doc)
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


def _python_sources(cfg: EmbeddedCorpusConfig, root: Path) -> tuple[list[str], list[str], int]:
    docs, code, n_files = [], [], 0
    for path in tqdm(_stdlib_files(root), desc="embedded: stdlib", unit="file", leave=False):
        try:
            file_docs, file_code = _file_docs_and_code(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # e.g. files written for another Python version
        n_files += 1
        docs += _chunks(file_docs, cfg.min_chars, cfg.max_chars)
        code += _chunks(file_code, cfg.min_chars, cfg.max_chars)
    return _dedup(docs), _dedup(code), n_files


def _site_dirs() -> list[Path]:
    dirs = {Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return sorted(d for d in dirs if d.is_dir())


def _dist_infos(site_dirs: list[Path]) -> list[Path]:
    return [info for d in site_dirs for info in sorted(d.glob("*.dist-info")) if info.is_dir()]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _licenses(cfg: EmbeddedCorpusConfig, infos: list[Path]) -> tuple[list[str], int]:
    files: list[Path] = []
    for info in tqdm(infos, desc="embedded: licenses", unit="pkg", leave=False):
        files += sorted(
            p for p in info.rglob("*") if p.is_file() and p.name.upper().startswith(_LICENSE_PREFIXES)
        )
    py_license = _stdlib_root() / "LICENSE.txt"
    if py_license.is_file():
        files.append(py_license)
    docs = []
    for f in files:
        text = _read_text(f)
        if text:
            docs += _chunks(re.split(r"\n\s*\n", text), cfg.min_chars, cfg.max_chars)
    # Many packages ship the same MIT/BSD/Apache text: keep one copy of each.
    return _dedup(docs), len(files)


def _package_docs(cfg: EmbeddedCorpusConfig, infos: list[Path]) -> tuple[list[str], int]:
    docs, n_files = [], 0
    for info in tqdm(infos, desc="embedded: package docs", unit="pkg", leave=False):
        text = _read_text(info / "METADATA")
        if not text:
            continue
        n_files += 1
        _, _, body = text.partition("\n\n")  # the headers end at the first blank line
        docs += _chunks(re.split(r"\n\s*\n", body), cfg.min_chars, cfg.max_chars)
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


# ----------------------------------------------------------------------------------------------- reference


_WORD = re.compile(r"\S+")
# A word of >= 3 ASCII letters, followed only by closing punctuation (not "name()" or "a.b").
_TARGET = re.compile(r"([A-Za-z]{3,})[.,;:!?'\")\]]*")


def lambada_example(doc: str, max_context_chars: int = 1000, look_back: int = 8) -> dict[str, str] | None:
    """LAMBADA form of a document: ``context`` is the text before its last word, ``target`` " " + that word.

    The last word is the last of the final ``look_back`` whitespace-split words made of >= 3 ASCII letters
    followed only by closing punctuation (``word.``, ``word,"``); the text after it is dropped. The context keeps
    the document's own text (up to ``max_context_chars``, cut at a word boundary). None when no word fits
    or the context would have fewer than 5 words.
    """
    spans = list(_WORD.finditer(doc))
    for m in reversed(spans[-look_back:]):
        target = _TARGET.fullmatch(m.group())
        if target:
            word = target.group(1)
            context = doc[: m.start()].rstrip()
            if len(context) > max_context_chars:
                cut = len(context) - max_context_chars
                if not context[cut - 1].isspace():  # the cut falls inside a word: drop that word
                    space = re.search(r"\s", context[cut:])
                    cut = cut + space.end() if space else len(context)
                context = context[cut:].lstrip()
            if len(context.split()) >= 5:
                return {"context": context, "target": " " + word}
            return None
    return None


# ----------------------------------------------------------------------------------------------- build


def build_embedded_corpus(cfg: EmbeddedCorpusConfig, out_dir: str | Path) -> dict:
    """Gather the embedded corpus and its reference set into ``out_dir``.

    Writes ``corpus.jsonl`` ({"text", "domain"} per line, domains interleaved in seeded order),
    ``reference.jsonl`` ({"context", "target"} per line) and ``embedded_manifest.json`` (config, counts,
    sources). Returns {"corpus": Path, "reference": Path, "manifest": Path, "docs_per_domain": {domain: n},
    "reference_examples": n}. Raises EmbeddedCorpusError if a domain finds no text on this machine.
    """
    out = Path(out_dir)
    rng = random.Random(cfg.seed)
    stdlib = _stdlib_root()
    site_dirs = _site_dirs()
    infos = _dist_infos(site_dirs)

    python_docs, python_code, n_py = _python_sources(cfg, stdlib)
    licenses, n_lic = _licenses(cfg, infos)
    package_docs, n_meta = _package_docs(cfg, infos)
    by_domain = {
        "python_docs": python_docs,
        "python_code": python_code,
        "licenses": licenses,
        "package_docs": package_docs,
    }
    where = {
        "python_docs": f"docstrings of the .py files under {stdlib}",
        "python_code": f"function/class definitions of the .py files under {stdlib}",
        "licenses": f"LICENSE*/LICENCE*/COPYING* files of *.dist-info in {[str(d) for d in site_dirs]}",
        "package_docs": f"*.dist-info/METADATA descriptions in {[str(d) for d in site_dirs]}",
    }
    for name, docs in by_domain.items():
        if not docs:
            raise EmbeddedCorpusError(
                f"embedded domain {name!r} is empty: found no text in {where[name]}. Install the missing "
                "files or build your own corpus and run `mates-megatron prepare --input FILE.jsonl`"
            )

    # Hold the reference documents out before capping, so they can never reach the corpus.
    pool = by_domain[cfg.reference_domain]
    rng.shuffle(pool)
    reference = []
    while pool and len(reference) < cfg.reference_size:
        ex = lambada_example(pool.pop())
        if ex:
            reference.append(ex)
    if len(reference) < cfg.reference_size:
        raise EmbeddedCorpusError(
            f"only {len(reference)} reference examples could be drawn from {cfg.reference_domain!r} "
            f"({where[cfg.reference_domain]}); lower EmbeddedCorpusConfig.reference_size"
        )
    if not pool:
        raise EmbeddedCorpusError(
            f"the reference set used every document of {cfg.reference_domain!r}, none is left for the "
            "corpus; lower EmbeddedCorpusConfig.reference_size"
        )
    for name, docs in by_domain.items():
        if len(docs) > cfg.max_docs_per_domain:
            by_domain[name] = rng.sample(docs, cfg.max_docs_per_domain)
    real = [d for docs in by_domain.values() for d in docs]
    # About one document in nine is junk: enough for selection to find, not enough to dominate.
    by_domain["junk"] = _junk(real, min(cfg.max_docs_per_domain, max(len(real) // 8, 1)), rng, cfg)

    rows = [{"text": t, "domain": name} for name, docs in by_domain.items() for t in docs]
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    corpus, ref_path, manifest_path = (
        out / "corpus.jsonl",
        out / "reference.jsonl",
        out / "embedded_manifest.json",
    )
    _write_jsonl(corpus, rows)
    _write_jsonl(ref_path, reference)
    counts = {name: len(docs) for name, docs in by_domain.items()}
    manifest = {
        "format": EMBEDDED_FORMAT,
        "config": asdict(cfg),
        "docs_per_domain": counts,
        "chars_per_domain": {name: sum(map(len, docs)) for name, docs in by_domain.items()},
        "reference_examples": len(reference),
        "sources": {
            **where,
            "junk": "generated from the words of the other domains (seeded)",
            "files": {"stdlib_py": n_py, "license_files": n_lic, "metadata_files": n_meta},
            **_machine(infos),
        },
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return {
        "corpus": corpus,
        "reference": ref_path,
        "manifest": manifest_path,
        "docs_per_domain": counts,
        "reference_examples": len(reference),
    }


def _machine(infos: list[Path]) -> dict:
    """What the gathered text depends on besides the config: the Python (stdlib) and the installed packages."""
    return {"python": platform.python_version(), "distributions": [info.name for info in infos]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
