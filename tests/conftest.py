"""Shared fixtures: a small copy of the embedded data, prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory):
    """Embedded corpus with few docs per domain, prepared to an indexed dataset + WebDataset shards."""
    from mates_lab.data.embedded import EmbeddedCorpusConfig, build_embedded_corpus
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    out = tmp_path_factory.mktemp("embedded")
    build_embedded_corpus(EmbeddedCorpusConfig(max_docs_per_domain=300, reference_size=32), out)
    prepared = prepare_corpus(PrepareConfig(input=out / "corpus.jsonl", output_prefix=out / "train"))
    return {
        "dir": out,
        "prefix": str(out / "train"),
        "reference": str(out / "reference.jsonl"),
        "prepared": prepared,
    }


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny transports and solves on 2 busy cores crawl with a second torch
    thread (10 to 30x slower, and a 20,000-pass test stalled past 20 minutes)."""
    from mates_lab.acquisition.strategies import one_thread

    with one_thread():
        yield
