"""The embedded default corpus: real text gathered at prepare time from what the machine carries.

Nothing text-like is committed to the repository. Domains:

- python_docs:  docstrings of the Python standard library (parsed with ``ast``, never imported)
- python_code:  source of standard-library functions and classes
- licenses:     license texts of the installed packages and of Python itself (exact duplicates dropped)
- package_docs: the long descriptions (READMEs) in the installed packages' METADATA
- junk:         deliberately low quality: word-shuffled text, one phrase repeated, character noise

The reference set is LAMBADA-style (context, final word) and comes from ``reference_domain`` documents
held out of the corpus.
"""

from __future__ import annotations

import ast
import json
import random
import site
import string
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

DOMAINS = ("python_docs", "python_code", "licenses", "package_docs", "junk")
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


@dataclass
class EmbeddedCorpusConfig:
    """How much of each domain to gather, and the reference set."""

    seed: int = 1234
    """Seed of every random choice (sampling, junk generation)."""
    max_docs_per_domain: int = 6000
    """Cap per domain (a seeded sample when a domain has more)."""
    reference_size: int = 256
    """Reference examples, held out of the corpus."""
    reference_domain: str = "python_docs"
    """Domain the reference set is drawn from."""
    min_chars: int = 200
    """Shortest document; shorter pieces of one source are merged."""
    max_chars: int = 2000
    """Longest document; longer texts are split at paragraph or line boundaries."""

    def __post_init__(self) -> None:
        if self.reference_domain not in DOMAINS[:-1]:
            raise ValueError(
                f"EmbeddedCorpusConfig.reference_domain={self.reference_domain!r}: choose one of {DOMAINS[:-1]}"
            )
        if self.max_docs_per_domain < 1 or self.reference_size < 1:
            raise ValueError("EmbeddedCorpusConfig.max_docs_per_domain and reference_size must be >= 1")
        if not 0 < self.min_chars < self.max_chars:
            raise ValueError("EmbeddedCorpusConfig needs 0 < min_chars < max_chars")


def _chunks(pieces: list[str], lo: int, hi: int) -> Iterator[str]:
    """Merge consecutive pieces up to ``hi`` characters; emit merged docs of at least ``lo``."""
    buf = ""
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        while len(piece) > hi:  # split an overlong piece at a line break
            cut = piece.rfind("\n", lo, hi)
            cut = cut if cut > 0 else hi
            if buf:
                if len(buf) >= lo:
                    yield buf
                buf = ""
            yield piece[:cut].strip()
            piece = piece[cut:].strip()
        if len(buf) + len(piece) + 2 > hi and buf:
            if len(buf) >= lo:
                yield buf
            buf = ""
        buf = f"{buf}\n\n{piece}" if buf else piece
    if len(buf) >= lo:
        yield buf


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def _python_sources(cfg: EmbeddedCorpusConfig) -> tuple[list[str], list[str]]:
    docs, code = [], []
    for path in tqdm(_stdlib_files(), desc="stdlib", unit="file", leave=False):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        file_docs, file_code = [], []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                d = ast.get_docstring(node)
                if d and len(d.split()) >= 5:
                    file_docs.append(d)
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.col_offset == 0:
                seg = ast.get_source_segment(source, node)
                if seg:
                    file_code.append(seg)
        docs += _chunks(file_docs, cfg.min_chars, cfg.max_chars)
        code += _chunks(file_code, cfg.min_chars, cfg.max_chars)
    return docs, code


def _site_dirs() -> list[Path]:
    dirs = {Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    return sorted(d for d in dirs if d.is_dir())


def _licenses(cfg: EmbeddedCorpusConfig) -> list[str]:
    files: list[Path] = []
    for d in _site_dirs():
        for info in sorted(d.glob("*.dist-info")):
            files += sorted(
                p for p in info.rglob("*") if p.is_file() and p.name.upper().startswith(("LICEN", "COPYING"))
            )
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.is_file():
        files.append(py_license)
    seen: set[str] = set()
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in _chunks(text.split("\n\n"), cfg.min_chars, cfg.max_chars):
            key = " ".join(doc.split())
            if key not in seen:  # many packages ship the same MIT/BSD/Apache text
                seen.add(key)
                out.append(doc)
    return out


def _package_docs(cfg: EmbeddedCorpusConfig) -> list[str]:
    out = []
    for d in _site_dirs():
        for meta in sorted(d.glob("*.dist-info/METADATA")):
            try:
                text = meta.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            _, _, body = text.partition("\n\n")  # the headers end at the first blank line
            out += _chunks(body.split("\n\n"), cfg.min_chars, cfg.max_chars)
    return out


def _junk(sources: list[str], n: int, rng: random.Random, cfg: EmbeddedCorpusConfig) -> list[str]:
    words = [w for doc in sources for w in doc.split()]
    out = []
    for i in range(n):
        length = rng.randint(cfg.min_chars, cfg.max_chars)
        kind = i % 3
        if kind == 0:  # words of real text in random order
            text = " ".join(rng.choice(words) for _ in range(length // 6))
        elif kind == 1:  # one short phrase, over and over
            phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            text = " ".join([phrase] * (length // (len(phrase) + 1) + 1))
        else:  # character noise
            alphabet = string.ascii_letters + string.punctuation + "    "
            text = "".join(rng.choice(alphabet) for _ in range(length))
        out.append(text[: cfg.max_chars])
    return out


def _lambada(doc: str) -> dict[str, str] | None:
    """Context = the text before the last alphabetic word (>= 3 letters); target = that word."""
    words = doc.split()
    for i in range(len(words) - 1, max(len(words) - 8, 0), -1):
        w = words[i].strip(string.punctuation)
        if len(w) >= 3 and w.isalpha() and words[i].startswith(w):
            context = " ".join(words[:i])
            if len(context) > 1000:
                context = context[-1000:].split(" ", 1)[-1]
            if len(context.split()) >= 5:
                return {"context": context, "target": " " + w}
    return None


def build_embedded_corpus(cfg: EmbeddedCorpusConfig, out_dir: str | Path) -> dict:
    """Write OUT/corpus.jsonl, OUT/reference.jsonl and OUT/embedded_manifest.json; return paths and counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    python_docs, python_code = _python_sources(cfg)
    by_domain = {
        "python_docs": python_docs,
        "python_code": python_code,
        "licenses": _licenses(cfg),
        "package_docs": _package_docs(cfg),
    }
    for name, docs in by_domain.items():
        if not docs:
            where = {"licenses": "*.dist-info/LICENSE*", "package_docs": "*.dist-info/METADATA"}.get(
                name, "the stdlib"
            )
            raise RuntimeError(f"embedded domain {name!r} is empty: found nothing in {where} on this machine")

    # Hold the reference documents out before capping, so they are never in the corpus.
    pool = by_domain[cfg.reference_domain]
    rng.shuffle(pool)
    reference = []
    while pool and len(reference) < cfg.reference_size:
        ex = _lambada(pool.pop())
        if ex:
            reference.append(ex)
    for name in by_domain:
        docs = by_domain[name]
        if len(docs) > cfg.max_docs_per_domain:
            docs = rng.sample(docs, cfg.max_docs_per_domain)
        by_domain[name] = docs
    real = [d for docs in by_domain.values() for d in docs]
    by_domain["junk"] = _junk(real, min(cfg.max_docs_per_domain, max(len(real) // 8, 1)), rng, cfg)

    rows = [{"text": t, "domain": name} for name, docs in by_domain.items() for t in docs]
    rng.shuffle(rows)
    corpus, ref_path = out / "corpus.jsonl", out / "reference.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with ref_path.open("w", encoding="utf-8") as f:
        for r in reference:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {name: len(docs) for name, docs in by_domain.items()}
    manifest = {"config": asdict(cfg), "docs_per_domain": counts, "reference_examples": len(reference)}
    (out / "embedded_manifest.json").write_text(json.dumps(manifest, indent=1))
    return {
        "corpus": corpus,
        "reference": ref_path,
        "docs_per_domain": counts,
        "reference_examples": len(reference),
    }
