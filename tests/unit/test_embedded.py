"""The embedded corpus: real text of five domains, a held-out LAMBADA-style reference set, deterministic."""

from __future__ import annotations

import json

import pytest

from mates_megatron.data.embedded import DOMAINS, EmbeddedCorpusConfig, build_embedded_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = EmbeddedCorpusConfig(max_docs_per_domain=60, reference_size=20)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return build_embedded_corpus(cfg, a), build_embedded_corpus(cfg, b)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_domains_reference_and_determinism(built):
    first, second = built
    rows = _rows(first["corpus"])
    assert {r["domain"] for r in rows} == set(DOMAINS)
    assert all(0 < first["docs_per_domain"][d] <= 60 for d in DOMAINS)
    assert first["corpus"].read_bytes() == second["corpus"].read_bytes()
    assert first["reference"].read_bytes() == second["reference"].read_bytes()

    ref = _rows(first["reference"])
    assert len(ref) == 20
    texts = [r["text"] for r in rows]
    for ex in ref:
        target = ex["target"]
        assert target.startswith(" ") and target[1:].isalpha() and len(target) >= 4
        # Held out: no corpus document contains the reference passage.
        assert not any(ex["context"][-200:] in t for t in texts)


def test_junk_is_measurably_worse(built):
    rows = _rows(built[0]["corpus"])

    def degenerate_share(domain):
        """Share of docs that are highly repetitive or mostly not words."""
        bad = total = 0
        for r in rows:
            if r["domain"] != domain:
                continue
            words = r["text"].split()
            repetitive = len(set(words)) / len(words) < 0.2
            noise = sum(w.strip(".,:;()'\"").isalpha() for w in words) / len(words) < 0.3
            bad += repetitive or noise
            total += 1
        return bad / total

    # Two kinds of junk in three (one phrase repeated, character noise) are degenerate by construction.
    assert degenerate_share("junk") > 0.6
    assert degenerate_share("python_docs") < 0.05
    assert degenerate_share("licenses") < 0.05


def test_config_validation():
    with pytest.raises(ValueError, match="reference_domain='junk'"):
        EmbeddedCorpusConfig(reference_domain="junk")
