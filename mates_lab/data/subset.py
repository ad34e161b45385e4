"""A prepared data directory restricted to some of its domains: the corpus, the held-out documents and the
indexed dataset (prepared as `mates-megatron prepare` does), for benches that need fewer sources than the
embedded corpus's five (Projektor's paper experiment has three)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD = "subset.json"


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def subset_domains(src: Path, out: Path, domains: list[str]) -> dict[str, Any]:
    """``out/corpus.jsonl``, ``out/heldout.jsonl`` and ``out/train.*`` holding only ``domains`` of ``src``'s
    (an embedded data directory). Built once: a directory built from another source or other domains is
    refused rather than mixed."""
    from mates_lab.data.decoys import read_corpus
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    src, out = Path(src), Path(out)
    want = {"source": str(src.resolve()), "domains": list(domains)}
    record = out / RECORD
    if record.is_file():
        built = json.loads(record.read_text())
        if {k: built[k] for k in want} != want:
            raise ValueError(
                f"{out} holds a subset of {built['source']} with domains {built['domains']}, not {want}: "
                "remove it or use another --work"
            )
        return built
    if len(set(domains)) != len(domains) or len(domains) < 2:
        raise ValueError(f"domains {domains}: at least two, each named once")
    corpus = read_corpus(src / "corpus.jsonl")
    heldout = read_corpus(src / "heldout.jsonl")
    have = sorted({r.get("domain", "default") for r in corpus})
    missing = [d for d in domains if d not in have]
    if missing:
        raise ValueError(f"{src / 'corpus.jsonl'} has no domain {missing}; it has {have}")
    keep = set(domains)
    corpus = [r for r in corpus if r.get("domain", "default") in keep]
    heldout = [r for r in heldout if r.get("domain", "default") in keep]
    short = [d for d in domains if sum(r["domain"] == d for r in heldout) < 2]
    if short:
        raise ValueError(f"{src / 'heldout.jsonl'}: domains {short} have fewer than 2 held-out documents")
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "corpus.jsonl", corpus)
    _write(out / "heldout.jsonl", heldout)
    prepared = prepare_corpus(PrepareConfig(input=out / "corpus.jsonl", output_prefix=out / "train"))
    built = {**want, "documents": len(corpus), "heldout_documents": len(heldout),
             "tokens_per_domain": prepared.tokens_per_domain}  # fmt: skip
    record.write_text(json.dumps(built, indent=1))
    return built
