"""`mates_lab.data.subset`: a prepared data directory restricted to some domains (Projektor's 3 sources)."""

import json

import pytest

from mates_lab.data.subset import subset_domains


def _domains(path):
    return [json.loads(line)["domain"] for line in path.read_text().splitlines() if line.strip()]


def test_subset_keeps_exactly_the_named_domains(small_embedded, tmp_path):
    src = small_embedded["dir"]
    keep = ["python_docs", "package_docs", "python_code"]
    built = subset_domains(src, tmp_path / "d", keep)
    corpus = _domains(src / "corpus.jsonl")
    # Every document of the kept domains, in order, and none of the others.
    assert _domains(tmp_path / "d" / "corpus.jsonl") == [d for d in corpus if d in keep]
    held = _domains(src / "heldout.jsonl")
    assert _domains(tmp_path / "d" / "heldout.jsonl") == [d for d in held if d in keep]
    meta = json.loads((tmp_path / "d" / "train.meta.json").read_text())
    assert sorted(meta["domains"]) == sorted(keep)
    assert meta["num_docs"] == sum(d in keep for d in corpus)
    assert built["tokens_per_domain"] == meta["tokens_per_domain"]
    # Built once: asked again with the same domains it is reused, with others it is refused.
    assert subset_domains(src, tmp_path / "d", keep) == built
    with pytest.raises(ValueError, match="remove it or use another --work"):
        subset_domains(src, tmp_path / "d", keep[:2])


def test_subset_refuses_an_unknown_or_repeated_domain(small_embedded, tmp_path):
    with pytest.raises(ValueError, match=r"has no domain \['poetry'\]"):
        subset_domains(small_embedded["dir"], tmp_path / "a", ["python_docs", "poetry"])
    with pytest.raises(ValueError, match="each named once"):
        subset_domains(small_embedded["dir"], tmp_path / "b", ["junk", "junk"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
