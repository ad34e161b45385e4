"""The embedded corpus: real text of five domains, held-out reference/eval/held-out sets split by source file,
gathered from mates-megatron's dependency closure only, deterministic."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
import sys

import pytest

from mates_lab.data import embedded, embedded_sources
from mates_lab.data.embedded import (
    DOMAINS,
    EmbeddedCorpusConfig,
    EmbeddedCorpusError,
    build_embedded_corpus,
    lambada_example,
)
from mates_lab.data.embedded_check import check_embedded_data, ensure_embedded_data

CAP, REF, EVAL, HELD_REF, HELD = 50, 20, 30, 10, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = _cfg()
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return build_embedded_corpus(cfg, a), build_embedded_corpus(cfg, b)


def _cfg(**changes):
    sizes = dict(
        max_docs_per_domain=CAP,
        reference_size=REF,
        eval_size=EVAL,
        heldout_docs_reference_domain=HELD_REF,
        heldout_docs_per_domain=HELD,
    )
    return EmbeddedCorpusConfig(**{**sizes, **changes})


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_domains_counts_and_sizes(built):
    first, _ = built
    rows = _rows(first["corpus"])
    assert {r["domain"] for r in rows} == set(DOMAINS)
    # Every real domain has more than CAP docs on any machine with Python; junk is 1/8 of the real docs.
    assert first["docs_per_domain"] == {**{d: CAP for d in DOMAINS[:-1]}, "junk": 4 * CAP // 8}
    assert all(200 <= len(r["text"]) <= 2000 for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)  # no exact duplicates (licenses are deduplicated)
    manifest = json.loads(first["manifest"].read_text())
    assert manifest["docs_per_domain"] == first["docs_per_domain"]
    assert manifest["config"]["max_docs_per_domain"] == CAP and manifest["reference_examples"] == REF
    assert set(manifest["sources"]) >= set(DOMAINS) and manifest["sources"]["files"]["stdlib_py"] > 100
    assert manifest["eval_examples"] == first["eval_examples"] == EVAL
    assert manifest["sha256"] == {
        first[k].name: hashlib.sha256(first[k].read_bytes()).hexdigest()
        for k in ("corpus", "reference", "eval_lambada", "heldout")
    }


def test_heldout_has_the_configured_count_per_domain(built):
    first, _ = built
    rows = _rows(first["heldout"])
    want = {d: HELD for d in DOMAINS} | {"python_docs": HELD_REF}
    assert {d: sum(r["domain"] == d for r in rows) for d in DOMAINS} == want
    assert first["heldout_docs_per_domain"] == want
    assert [r["domain"] for r in rows] == sorted((r["domain"] for r in rows), key=DOMAINS.index)
    assert all(set(r) == {"text", "domain"} and len(r["text"]) >= 200 for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    ev = _rows(first["eval_lambada"])
    assert len(ev) == EVAL and all(set(ex) == {"context", "target"} for ex in ev)
    # Eval examples and held-out documents are different documents, and the probe set is apart from both.
    held_ref = [r["text"] for r in rows if r["domain"] == "python_docs"]
    for ex in ev + _rows(first["reference"]):
        assert not any(ex["context"][-200:] in t for t in held_ref)
    ref_contexts = {ex["context"] for ex in _rows(first["reference"])}
    assert not ref_contexts & {ex["context"] for ex in ev}


def test_no_evaluation_text_reaches_the_corpus(built):
    first, _ = built
    corpus = "\n".join(r["text"] for r in _rows(first["corpus"]))
    for ex in _rows(first["reference"]) + _rows(first["eval_lambada"]):
        assert ex["context"][-200:] not in corpus
    for r in _rows(first["heldout"]):
        assert r["text"] not in corpus, r["domain"]


def test_probe_eval_and_pool_sources_are_disjoint(built):
    first, _ = built
    manifest = json.loads(first["manifest"].read_text())
    splits = manifest["splits"]
    probe, ev, pool = (set(splits[k]) for k in ("probe_sources", "eval_sources", "pool_sources"))
    assert probe and ev and pool and not (probe & ev or probe & pool or ev & pool)
    assert [splits["files"][k] for k in ("probe", "eval", "pool")] == [len(probe), len(ev), len(pool)]
    assert len(pool) > len(probe) + len(ev)  # only as many files as the small sets need
    held_sources = {name: set(h["sources"]) for name, h in splits["heldout"].items()}
    assert held_sources["python_code"] and splits["heldout"]["python_code"]["by"] == "source"
    assert not held_sources["python_code"] & (probe | ev | pool)
    # Every document of a probe or eval file (docstrings and code: they share the file) is out of the corpus.
    corpus = {r["text"] for r in _rows(first["corpus"])}
    root = embedded_sources._stdlib_root()
    for source in sorted(probe | ev | held_sources["python_code"]):
        docs, code = embedded_sources._file_docs_and_code((root / source).read_text(encoding="utf-8"))
        for piece in [*embedded_sources._chunks(docs, 200, 2000), *embedded_sources._chunks(code, 200, 2000)]:
            assert piece not in corpus, source


def _split_docs():
    """Synthetic reference-domain docs: 40 sources of 3 documents, each with a LAMBADA example."""
    return [
        (f"src{i:02d}.py", f"Document {j} of source {i} has several words and ends in a word{i}x{j} finish.")
        for i in range(40)
        for j in range(3)
    ]


def test_reference_split_takes_whole_sources_only_as_needed():
    docs = _split_docs()
    cfg = EmbeddedCorpusConfig(reference_size=5, eval_size=4, heldout_docs_reference_domain=2)
    split = embedded._split_reference(cfg, docs, embedded.random.Random(0), "synthetic")
    probe, ev, pool = set(split.probe_sources), set(split.eval_sources), set(split.pool_sources)
    assert not (probe & ev or probe & pool or ev & pool) and probe | ev | pool == {s for s, _ in docs}
    assert (len(probe), len(ev), len(pool)) == (2, 2, 36)  # 3 docs a source: 2 sources for 5, 2 for 4 + 2
    assert len(split.reference) == 5 and len(split.eval_examples) == 4 and len(split.heldout) == 2

    def source(ex):
        return next(s for s, t in docs if t.startswith(ex["context"] + ex["target"]))

    assert {source(ex) for ex in split.reference} <= probe
    assert {source(ex) for ex in split.eval_examples} <= ev
    assert {s for s, t in docs if t in split.heldout} <= ev
    eval_docs = {
        t for s, t in docs for ex in split.eval_examples if t.startswith(ex["context"] + ex["target"])
    }
    assert not eval_docs & set(split.heldout)  # other documents than the eval examples'
    with pytest.raises(EmbeddedCorpusError, match=r"every source of 'python_docs'"):
        big = EmbeddedCorpusConfig(reference_size=60, eval_size=40, heldout_docs_reference_domain=20)
        embedded._split_reference(big, docs, embedded.random.Random(0), "synthetic")
    with pytest.raises(EmbeddedCorpusError, match=r"lower EmbeddedCorpusConfig.eval_size"):
        big = EmbeddedCorpusConfig(reference_size=60, eval_size=61)
        embedded._split_reference(big, docs, embedded.random.Random(0), "synthetic")
    with pytest.raises(EmbeddedCorpusError, match=r"lower EmbeddedCorpusConfig.reference_size"):
        embedded._split_reference(
            EmbeddedCorpusConfig(reference_size=121), docs, embedded.random.Random(0), "synthetic"
        )


def test_hold_out_by_source_else_by_document():
    docs = [(f"dist{i}", f"text {i} {j}") for i in range(10) for j in range(2)]
    texts, how, sources = embedded._hold_out("licenses", docs, 3, {"dist0"}, embedded.random.Random(0))
    assert how == "source" and len(sources) == 2 and "dist0" not in sources and len(texts) == 3
    assert {t.split()[1] for t in texts} <= {s[4:] for s in sources}
    # One distribution holds most of the text: holding it out would leave less than half, so documents.
    docs = [("big", f"big {j}") for j in range(30)] + [("small", "small 0")]
    for seed in range(4):
        texts, how, sources = embedded._hold_out("licenses", docs, 3, set(), embedded.random.Random(seed))
        assert how == "document" and sources == [] and len(set(texts)) == 3
    with pytest.raises(EmbeddedCorpusError, match=r"'licenses' has 2 documents.*heldout_docs_per_domain"):
        embedded._hold_out("licenses", docs[:2], 3, set(), embedded.random.Random(0))


def _fake_dist(site, name, version="1.0", requires=(), license_text=None):
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    headers += [f"Requires-Dist: {r}" for r in requires]
    body = f"{name} is a package with a long description. " * 20
    (info / "METADATA").write_text("\n".join(headers) + "\n\n" + body + "\n", encoding="utf-8")
    if license_text:
        (info / "LICENSE").write_text(license_text, encoding="utf-8")
    return importlib.metadata.PathDistribution(info)


def test_dependency_closure_follows_core_requirements_and_markers(tmp_path):
    dists = {
        "a": _fake_dist(tmp_path, "A", requires=["b>=1", 'c; extra == "cuda"', 'd; python_version < "3"']),
        "b": _fake_dist(tmp_path, "b", requires=["E_F[x]", "a", "mates-megatron"]),  # a cycle, and us
        "e-f": _fake_dist(tmp_path, "e.f", "2.0", requires=['g; extra == "x"', 'h; extra == "y"']),
        "g": _fake_dist(tmp_path, "g"),
        "c": _fake_dist(tmp_path, "c"),
        "d": _fake_dist(tmp_path, "d"),
        "h": _fake_dist(tmp_path, "h"),
        "extra-only": _fake_dist(tmp_path, "extra-only"),
        "lab-dep": _fake_dist(tmp_path, "lab-dep"),
        "mates-megatron": _fake_dist(tmp_path, "mates-megatron"),
    }
    requires = [
        "A",
        "not-installed>=1",
        'extra-only; extra == "test"',
        "bad requirement !!",
        'lab-dep; extra == "lab"',
    ]
    closure = embedded_sources._dependency_closure(requires, dists.get)
    # The root's `lab` extra counts (the builder's own requirements), its other extras do not.
    assert [name for name, _ in closure] == ["a", "b", "e-f", "g", "lab-dep"]
    assert embedded_sources._machine(closure)["distributions"] == [
        "a==1.0",
        "b==1.0",
        "e-f==2.0",
        "g==1.0",
        "lab-dep==1.0",
    ]
    # Installing more (what extras bring) does not change it.
    dists["zzz"] = _fake_dist(tmp_path, "zzz")
    assert embedded_sources._dependency_closure(requires, dists.get) == closure


def test_core_closure_of_this_install_leaves_extras_out():
    names = [name for name, _ in embedded_sources._dependency_closure()]
    assert names == sorted(names) and "mates-megatron" not in names
    assert {"torch", "numpy", "tqdm", "matplotlib", "packaging"} <= set(names)  # core and the lab's extra
    assert not {"pytest", "ruff", "transformer-engine"} & set(names)  # the te and test extras only


def test_an_extra_installed_distribution_does_not_change_the_output(built, tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_dist(site, "zzz-extra-pkg", license_text="Extra license text that would change the corpus. " * 10)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert (
        importlib.metadata.distribution("zzz-extra-pkg").version == "1.0"
    )  # installed, as far as Python knows
    again = build_embedded_corpus(_cfg(), tmp_path / "out")
    manifest = json.loads(again["manifest"].read_text())
    assert manifest["sha256"] == json.loads(built[0]["manifest"].read_text())["sha256"]
    assert again["manifest"].read_bytes() == built[0]["manifest"].read_bytes()
    assert not any(d.startswith("zzz") for d in manifest["sources"]["distributions"])


def test_deterministic_for_a_seed(built, tmp_path):
    first, second = built
    for key in ("corpus", "reference", "eval_lambada", "heldout", "manifest"):
        assert first[key].read_bytes() == second[key].read_bytes()
    other = build_embedded_corpus(_cfg(seed=7), tmp_path)
    for key in ("corpus", "reference", "eval_lambada", "heldout"):
        assert other[key].read_bytes() != first[key].read_bytes()


def _stale_copy(built, tmp_path, **manifest_changes):
    """data/embedded under tmp_path: a copy of the built manifest with ``manifest_changes`` applied."""
    out = tmp_path / "data" / "embedded"
    out.mkdir(parents=True)
    manifest = json.loads(built[0]["manifest"].read_text())
    manifest.update(manifest_changes)
    (out / "embedded_manifest.json").write_text(json.dumps(manifest))
    return out


def test_data_of_this_builder_and_machine_passes_the_check(built):
    assert check_embedded_data(built[0]["manifest"].parent) is None


def test_data_of_another_builder_is_refused_with_the_rebuild_command(built, tmp_path):
    out = _stale_copy(built, tmp_path, format=None)  # manifests before the format field had none
    with pytest.raises(EmbeddedCorpusError, match=r"embedded format None, this version builds format 2") as e:
        check_embedded_data(out)
    assert f"`mates-lab embedded --out {out}`" in str(e.value)
    (out / "embedded_manifest.json").unlink()
    with pytest.raises(EmbeddedCorpusError, match=r"embedded_manifest.json is missing or unreadable"):
        check_embedded_data(out)


def test_data_gathered_from_other_packages_is_a_warning_naming_them(built, tmp_path):
    sources = json.loads(built[0]["manifest"].read_text())["sources"]
    now = sources["distributions"]
    names = [d.split("==")[0] for d in now]
    assert now and all(re.fullmatch(r"[a-z0-9-]+==\S+", d) for d in now) and names == sorted(names)
    sources = {**sources, "python": "3.11.0", "distributions": [*now[1:], "gone-pkg==1.0"]}
    warning = check_embedded_data(_stale_copy(built, tmp_path, sources=sources))
    assert f"Python 3.11.0, now {platform.python_version()}" in warning
    assert f"distributions added ['{now[0]}'], removed ['gone-pkg==1.0']" in warning


def test_the_lab_refuses_stale_embedded_data_before_launching(built, tmp_path, monkeypatch, capsys):
    from mates_megatron import launch

    out = _stale_copy(built, tmp_path, format=None)
    (out / "train.bin").write_bytes(b"")  # prepared: the lab does not rebuild, it checks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    assert ensure_embedded_data({"data_prefix": "data/embedded/train"}) == 2
    assert "error: data/embedded was built by another mates-megatron" in capsys.readouterr().err


def test_the_plugin_launcher_names_the_lab_for_missing_embedded_data(tmp_path, monkeypatch, capsys):
    from mates_megatron import cli, launch

    config = tmp_path / "run.yaml"
    config.write_text("data_prefix: data/embedded/train\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    assert cli.main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data_prefix data/embedded/train: data/embedded/train.bin not found" in err
    assert "`mates-lab embedded --out data/embedded`" in err
    assert cli.main(["demo"]) == 2
    assert "run `mates-lab demo` (pip install '.[lab]')" in capsys.readouterr().err


def test_reference_is_held_out_lambada(built):
    first, _ = built
    ref = _rows(first["reference"])
    assert len(ref) == REF
    texts = [r["text"] for r in _rows(first["corpus"])]
    for ex in ref:
        assert set(ex) == {"context", "target"}
        assert re.fullmatch(r" [A-Za-z]{3,}", ex["target"])  # a single word, with its leading space
        assert len(ex["context"].split()) >= 5 and len(ex["context"]) <= 1000
        # Held out: no corpus document contains the passage the example was cut from.
        assert not any(ex["context"][-200:] in t for t in texts)


def test_lambada_example_cuts_before_the_last_word():
    doc = "Pack my box with five dozen liquor jugs.\nThe quick brown fox jumps over the lazy dog."
    assert lambada_example(doc) == {
        "context": "Pack my box with five dozen liquor jugs.\nThe quick brown fox jumps over the lazy",
        "target": " dog",
    }
    # Code-like or short final tokens are skipped for the last real word; text after it is dropped.
    assert lambada_example("one two three four five six words end here: call() 42 x")["target"] == " here"
    assert lambada_example("a b c d e f g h i j k 123 __init__ x()") is None
    assert lambada_example("too short context") is None
    long = " ".join(f"word{i}" for i in range(400)) + " finally"
    ex = lambada_example(long)
    assert ex["target"] == " finally" and len(ex["context"]) <= 1000
    assert long.endswith(ex["context"] + ex["target"])
    assert f" {ex['context'].split()[0]} " in long  # cut at a word boundary
    for max_chars in range(60, 80):  # wherever the cut falls, whole words are kept
        first = lambada_example(long, max_context_chars=max_chars)["context"].split()[0]
        assert f" {first} " in long


def test_junk_is_measurably_worse(built):
    rows = _rows(built[0]["corpus"])

    def degenerate(domain):
        """(docs that are one phrase repeated or mostly not words, docs) of a domain."""
        bad = total = 0
        for r in rows:
            if r["domain"] != domain:
                continue
            words = r["text"].split()
            # Repetition shows in word trigrams: a phrase of k words repeated gives about k distinct ones,
            # however long its words are (distinct words over words missed a long phrase repeated 4 times).
            trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
            repetitive = len(set(trigrams)) < 0.5 * len(trigrams)
            noise = sum(w.strip(".,:;()'\"").isalpha() for w in words) / len(words) < 0.3
            bad += repetitive or noise
            total += 1
        return bad, total

    # Junk doc i is of kind i % 3: kinds 1 (one phrase repeated) and 2 (character noise) are degenerate by
    # construction. Every one of them must be caught, but one: over 3 x 3000 generated docs the detector
    # missed 2 of 6000 (a phrase repeated about 3 times, noise that happened to split into letter words).
    bad, n = degenerate("junk")
    by_construction = sum(i % 3 != 0 for i in range(n))
    assert n >= 3 and bad >= by_construction - 1, (bad, by_construction, n)
    for domain in ("python_docs", "licenses", "package_docs"):
        bad, n = degenerate(domain)
        # Package READMEs come from whatever is installed; a few are mostly tables or badges (5 of 50 with
        # the packages of the test extra on 2026-11-23), against two thirds of junk.
        assert bad / n <= 0.2, (domain, bad, n)


def test_python_sources_are_parsed_not_imported():
    source = (
        '"""Module doc that is long enough to keep."""\n'
        "raise SystemExit('importing this file would exit')\n\n"
        "@decorator\n"
        "def f():\n"
        '    """Function doc that is long enough too."""\n'
        "    return 1\n\n"
        "class C:\n"
        '    """Class doc that is long enough too."""\n\n'
        "    def m(self):\n"
        '        """Method doc that is long enough too."""\n'
    )
    docs, code = embedded_sources._file_docs_and_code(source)
    assert docs == [
        "Module doc that is long enough to keep.",
        "Function doc that is long enough too.",
        "Class doc that is long enough too.",
        "Method doc that is long enough too.",
    ]  # source order
    assert code[0].startswith("@decorator\ndef f():") and code[0].endswith("return 1")
    assert code[1].startswith("class C:") and code[1].endswith('"""Method doc that is long enough too."""')


def test_chunks_merge_and_split():
    pieces = ["a" * 50, "b" * 60, "c" * 120, "d" * 30, "line\n" * 110]
    out = list(embedded_sources._chunks(pieces, 100, 200))
    assert all(100 <= len(d) <= 200 for d in out)
    assert out[:2] == ["a" * 50 + "\n\n" + "b" * 60, "c" * 120 + "\n\n" + "d" * 30]  # short pieces merged
    assert "".join(out[2:]).replace("\n", "") == "line" * 110  # the long piece is split at lines, not lost
    # Only a final fragment shorter than min_chars is dropped.
    assert list(embedded_sources._chunks(["x" * 90, "y" * 99], 100, 200)) == ["x" * 90 + "\n\n" + "y" * 99]
    assert list(embedded_sources._chunks(["x" * 150, "y" * 99], 100, 200)) == ["x" * 150]
    assert list(embedded_sources._chunks(["x" * 99], 100, 200)) == []


def test_empty_domain_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_stdlib_root", lambda: tmp_path / "no-stdlib")
    (tmp_path / "no-stdlib").mkdir()
    with pytest.raises(EmbeddedCorpusError, match=r"'python_docs' is empty: .*no-stdlib"):
        build_embedded_corpus(_cfg(max_docs_per_domain=5, reference_size=2), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference_domain": "junk"}, r"reference_domain='junk': choose one of"),
        ({"max_docs_per_domain": 0}, r"max_docs_per_domain=0: must be >= 1"),
        ({"reference_size": 0}, r"reference_size=0: must be >= 1"),
        ({"eval_size": 0}, r"eval_size=0: must be >= 1"),
        ({"heldout_docs_reference_domain": -1}, r"heldout_docs_reference_domain=-1: must be >= 1"),
        ({"heldout_docs_per_domain": 0}, r"heldout_docs_per_domain=0: must be >= 1"),
        ({"min_chars": 0}, r"min_chars=0: must be >= 1"),
        ({"min_chars": 300, "max_chars": 300}, r"max_chars=300: must be greater than min_chars=300"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbeddedCorpusConfig(**kwargs)
