"""The embedded default corpus: real text gathered at prepare time from what the machine carries.

Nothing text-like is committed to the repository. Domains:

- python_docs:  docstrings of the Python standard library (parsed with ``ast``, never imported)
- python_code:  source of standard-library functions and classes
- licenses:     license texts of the gathered distributions and of Python itself (exact duplicates dropped)
- package_docs: the long descriptions (READMEs) in the gathered distributions' METADATA
- junk:         deliberately low quality: word-shuffled text, one phrase repeated, character noise

The gathered distributions are the dependency closure of mates-megatron's *core* requirements (extras and
requirements whose environment markers do not hold are skipped; mates-megatron itself is left out), not
whatever else site-packages holds, so installing an extra does not change the corpus.

Every document keeps its source: the stdlib ``.py`` file (python_docs, python_code, relative to the stdlib
directory) or the distribution (licenses, package_docs; ``python`` for Python's own LICENSE.txt). Held-out
text is split off before the per-domain cap, by source wherever possible, so a source that feeds an
evaluation set feeds nothing to the corpus:

- the ``reference_domain``'s sources (seeded shuffle of the sorted list) go, in that order, to the probe
  reference set (``reference.jsonl``) until it has ``reference_size`` examples, then to the evaluation
  group (``eval_lambada.jsonl``, ``eval_size`` examples, and that domain's ``heldout_docs_reference_domain``
  held-out documents, other documents than the examples') until both are full; the rest is the pool's;
- every other domain holds out ``heldout_docs_per_domain`` documents (``heldout.jsonl``): by source (stdlib
  files, whole distributions) when the pool keeps at least half of the domain, else single documents;
  junk's are newly generated.

python_docs and python_code share their sources (a file's docstrings are also in its code), and so do
licenses and package_docs: a source held out in one is left out of the other's pool too, and no corpus
document is an exact copy (whitespace aside) of a held-out one.
Files written: ``corpus.jsonl`` ({"text", "domain"}), ``reference.jsonl`` and ``eval_lambada.jsonl``
({"context", "target"}, LAMBADA form), ``heldout.jsonl`` ({"text", "domain"}) and ``embedded_manifest.json``.
For a given seed and set of installed files the output is byte-identical.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from mates_lab.data.embedded_config import DOMAINS, EMBEDDED_FORMAT, EmbeddedCorpusConfig
from mates_lab.data.embedded_sources import (
    _ROOT_DISTRIBUTION,
    Doc,
    EmbeddedCorpusError,
    _dependency_closure,
    _junk,
    _licenses,
    _machine,
    _package_docs,
    _python_sources,
    _stdlib_root,
)
from mates_megatron.files import sha256_file, write_jsonl

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


# ----------------------------------------------------------------------------------------------- splits


def _by_source(docs: list[Doc]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for source, text in docs:
        out.setdefault(source, []).append(text)
    return out


def _shuffled(sources: Iterable[str], rng: random.Random) -> list[str]:
    order = sorted(sources)
    rng.shuffle(order)
    return order


@dataclass
class _ReferenceSplit:
    probe_sources: list[str]
    eval_sources: list[str]
    pool_sources: list[str]
    reference: list[dict[str, str]]
    eval_examples: list[dict[str, str]]
    heldout: list[str]


def _split_reference(
    cfg: EmbeddedCorpusConfig, docs: list[Doc], rng: random.Random, where: str
) -> _ReferenceSplit:
    """Split the reference domain's sources into probe, evaluation and pool groups (see the module docstring).

    Sources are taken in seeded order, each whole, only as many as the probe and evaluation sets need. In the
    evaluation group a document with a LAMBADA example goes to the eval set, any other to the held-out
    documents, whichever of the two is proportionally further behind, so both see the same sources.
    """
    groups = _by_source(docs)
    order = _shuffled(groups, rng)
    pos = 0
    probe: list[str] = []
    reference: list[dict[str, str]] = []
    while len(reference) < cfg.reference_size and pos < len(order):
        probe.append(order[pos])
        reference += filter(None, map(lambada_example, groups[order[pos]]))
        pos += 1
    if len(reference) < cfg.reference_size:
        raise EmbeddedCorpusError(
            f"only {len(reference)} reference examples could be drawn from {cfg.reference_domain!r} "
            f"({where}); lower EmbeddedCorpusConfig.reference_size"
        )
    evals: list[str] = []
    examples: list[dict[str, str]] = []
    heldout: list[str] = []
    n_eval, n_held = cfg.eval_size, cfg.heldout_docs_reference_domain
    while (len(examples) < n_eval or len(heldout) < n_held) and pos < len(order):
        evals.append(order[pos])
        for doc in groups[order[pos]]:
            ex = lambada_example(doc) if len(examples) < n_eval else None
            if ex and (len(heldout) >= n_held or len(examples) * n_held <= len(heldout) * n_eval):
                examples.append(ex)
            elif len(heldout) < n_held:
                heldout.append(doc)
        pos += 1
    if len(examples) < n_eval or len(heldout) < n_held:
        raise EmbeddedCorpusError(
            f"after the reference set, only {len(examples)} evaluation examples and {len(heldout)} held-out "
            f"documents could be drawn from {cfg.reference_domain!r} ({where}); lower "
            "EmbeddedCorpusConfig.eval_size or heldout_docs_reference_domain"
        )
    if pos == len(order):
        raise EmbeddedCorpusError(
            f"the reference and evaluation sets used every source of {cfg.reference_domain!r}, none is left "
            "for the corpus; lower EmbeddedCorpusConfig.reference_size, eval_size or heldout_docs_reference_domain"
        )
    return _ReferenceSplit(
        probe_sources=sorted(probe),
        eval_sources=sorted(evals),
        pool_sources=sorted(order[pos:]),
        reference=reference[: cfg.reference_size],
        eval_examples=examples,
        heldout=heldout,
    )


def _hold_out(
    name: str, docs: list[Doc], n: int, withheld: set[str], rng: random.Random
) -> tuple[list[str], str, list[str]]:
    """``n`` held-out documents of a domain other than the reference domain: (texts, "source" or "document",
    the sources held out whole).

    By source when possible: whole sources (stdlib files, distributions), not yet withheld, in seeded order
    until they hold ``n`` documents, provided the pool keeps at least half of the domain's documents (a few
    distributions may hold most of the license or README text). Else ``n`` single documents, a seeded sample.
    """
    candidates = [(s, t) for s, t in docs if s not in withheld]
    groups = _by_source(candidates)
    taken: list[str] = []
    texts: list[str] = []
    for source in _shuffled(groups, rng):
        if len(texts) >= n:
            break
        taken.append(source)
        texts += groups[source]
    if len(texts) >= n and len(candidates) - len(texts) >= max(len(candidates) / 2, 1):
        return texts[:n], "source", sorted(taken)
    if len(candidates) <= n:
        raise EmbeddedCorpusError(
            f"embedded domain {name!r} has {len(candidates)} documents: too few to hold out "
            f"{n} and keep some for the corpus; lower EmbeddedCorpusConfig.heldout_docs_per_domain"
        )
    return rng.sample([t for _, t in candidates], n), "document", []


def _key(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------- build


def build_embedded_corpus(cfg: EmbeddedCorpusConfig, out_dir: str | Path) -> dict:
    """Gather the embedded corpus, its reference set and its held-out evaluation sets into ``out_dir``.

    Writes ``corpus.jsonl`` ({"text", "domain"} per line, domains interleaved in seeded order),
    ``reference.jsonl`` (probe set) and ``eval_lambada.jsonl`` ({"context", "target"} per line),
    ``heldout.jsonl`` ({"text", "domain"}, domains in ``DOMAINS`` order) and ``embedded_manifest.json``
    (config, counts, source splits, distributions, sha256 of each written file). Returns {"corpus",
    "reference", "eval_lambada", "heldout", "manifest": Path, "docs_per_domain": {domain: n},
    "heldout_docs_per_domain": {domain: n}, "reference_examples": n, "eval_examples": n}. Raises
    EmbeddedCorpusError if a domain finds no text on this machine or is too small for the held-out sets.
    """
    out = Path(out_dir)
    rng = random.Random(cfg.seed)
    stdlib = _stdlib_root()
    dists = _dependency_closure()

    python_docs, python_code, n_py = _python_sources(cfg, stdlib)
    licenses, n_lic = _licenses(cfg, dists)
    package_docs, n_meta = _package_docs(cfg, dists)
    by_domain = {
        "python_docs": python_docs,
        "python_code": python_code,
        "licenses": licenses,
        "package_docs": package_docs,
    }
    gathered = f"the dependency closure of {_ROOT_DISTRIBUTION}'s core requirements"
    where = {
        "python_docs": f"docstrings of the .py files under {stdlib}",
        "python_code": f"function/class definitions of the .py files under {stdlib}",
        "licenses": f"LICENSE*/LICENCE*/COPYING* files of the *.dist-info of {gathered}, and Python's LICENSE.txt",
        "package_docs": f"METADATA descriptions of {gathered}",
    }
    for name, docs in by_domain.items():
        if not docs:
            raise EmbeddedCorpusError(
                f"embedded domain {name!r} is empty: found no text in {where[name]}. Install the missing "
                "files or build your own corpus and run `mates-megatron prepare --input FILE.jsonl`"
            )

    # Split held-out text off by source before capping, so it can never reach the corpus. Sources are shared
    # by python_docs/python_code (stdlib files) and by licenses/package_docs (distributions): one ``withheld``.
    split = _split_reference(cfg, by_domain[cfg.reference_domain], rng, where[cfg.reference_domain])
    withheld = {*split.probe_sources, *split.eval_sources}
    heldout: dict[str, list[str]] = {cfg.reference_domain: split.heldout}
    heldout_how: dict[str, dict] = {}
    for name, docs in by_domain.items():
        if name == cfg.reference_domain:
            continue
        texts, how, sources = _hold_out(name, docs, cfg.heldout_docs_per_domain, withheld, rng)
        heldout[name] = texts
        heldout_how[name] = {"by": how, "sources": sources}
        withheld.update(sources)
    # Exact copies across domains (a docstring alone in a function's code, a README quoting a license) too.
    held_text = {_key(t) for texts in heldout.values() for t in texts}
    held_text |= {_key(t) for s, t in by_domain[cfg.reference_domain] if s in withheld}
    for name, docs in by_domain.items():
        pool = [(s, t) for s, t in docs if s not in withheld and _key(t) not in held_text]
        if not pool:
            raise EmbeddedCorpusError(
                f"the held-out sets used every document of {name!r}, none is left for the corpus; lower "
                "EmbeddedCorpusConfig.heldout_docs_per_domain (or reference_size, eval_size)"
            )
        by_domain[name] = pool
    pool_sources = {name: len({s for s, _ in docs}) for name, docs in by_domain.items()}
    # The reference domain's pool group, less the sources another domain held out (python_code's files).
    ref_pool = [s for s in split.pool_sources if s not in withheld]

    texts_by_domain: dict[str, list[str]] = {}
    for name, docs in by_domain.items():
        texts = [t for _, t in docs]
        texts_by_domain[name] = (
            rng.sample(texts, cfg.max_docs_per_domain) if len(texts) > cfg.max_docs_per_domain else texts
        )
    real = [d for docs in texts_by_domain.values() for d in docs]
    # About one document in nine is junk: enough for selection to find, not enough to dominate.
    texts_by_domain["junk"] = _junk(real, min(cfg.max_docs_per_domain, max(len(real) // 8, 1)), rng, cfg)
    heldout["junk"] = _junk(real, cfg.heldout_docs_per_domain, rng, cfg)  # new random docs
    heldout_how["junk"] = {"by": "generated", "sources": []}

    rows = [{"text": t, "domain": name} for name, docs in texts_by_domain.items() for t in docs]
    rng.shuffle(rows)
    heldout_rows = [{"text": t, "domain": name} for name in DOMAINS for t in heldout[name]]
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "corpus": out / "corpus.jsonl",
        "reference": out / "reference.jsonl",
        "eval_lambada": out / "eval_lambada.jsonl",
        "heldout": out / "heldout.jsonl",
    }
    write_jsonl(paths["corpus"], rows)
    write_jsonl(paths["reference"], split.reference)
    write_jsonl(paths["eval_lambada"], split.eval_examples)
    write_jsonl(paths["heldout"], heldout_rows)
    counts = {name: len(docs) for name, docs in texts_by_domain.items()}
    heldout_counts = {name: len(heldout[name]) for name in DOMAINS}
    manifest = {
        "format": EMBEDDED_FORMAT,
        "config": asdict(cfg),
        "docs_per_domain": counts,
        "chars_per_domain": {name: sum(map(len, docs)) for name, docs in texts_by_domain.items()},
        "reference_examples": len(split.reference),
        "eval_examples": len(split.eval_examples),
        "heldout_docs_per_domain": heldout_counts,
        "splits": {
            "reference_domain": cfg.reference_domain,
            "files": {
                "probe": len(split.probe_sources),
                "eval": len(split.eval_sources),
                "pool": len(ref_pool),
                "held_out_for_other_domains": len(split.pool_sources) - len(ref_pool),
            },
            "probe_sources": split.probe_sources,
            "eval_sources": split.eval_sources,
            "pool_sources": ref_pool,
            "heldout": {name: heldout_how[name] for name in DOMAINS if name in heldout_how},
            "pool_sources_per_domain": pool_sources,
        },
        "sources": {
            **where,
            "junk": "generated from the words of the other domains (seeded)",
            "files": {
                "stdlib_py": n_py,
                "license_files": n_lic,
                "metadata_files": n_meta,
                "distributions": len(dists),
            },
            **_machine(dists),
        },
        "sha256": {path.name: sha256_file(path) for path in paths.values()},
    }
    manifest_path = out / "embedded_manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return {
        **paths,
        "manifest": manifest_path,
        "docs_per_domain": counts,
        "heldout_docs_per_domain": heldout_counts,
        "reference_examples": len(split.reference),
        "eval_examples": len(split.eval_examples),
    }
