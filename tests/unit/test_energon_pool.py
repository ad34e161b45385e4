"""Energon pool: tar shards prepared by Energon's own `energon prepare`, read in place through its index;
bad input named with its fix; a run trains from it through MatesSampler and resumes bit for bit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "megatron.energon",
    reason="megatron-energon is an optional extra: pip install 'mates-megatron[energon]'",
)
import webdataset as wds  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mates_megatron.pool.base import POOLS, PoolError  # noqa: E402
from mates_megatron.pool.energon_pool import EnergonPool  # noqa: E402

SEQ = 16
PER_SHARD, TRAIN_SHARDS = 24, 3  # + one 'val' shard
DOMAINS = ("code", "prose", "junk")
WORDS = [
    "the",
    "of",
    "model",
    "data",
    "a",
    "selection",
    "token",
    "round",
    "pool",
    "shard",
    "train",
    "loss",
    "influence",
    "reference",
]


def _docs(n: int):
    """(text, domain) of document i; lengths vary around SEQ tokens, so some sequences are padded."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, int(rng.integers(2, 30))).tolist()
        out.append((f"document {i}: " + " ".join(words) + ".", DOMAINS[i % 3]))
    return out


N_DOCS = PER_SHARD * (TRAIN_SHARDS + 1)
DOCS = _docs(N_DOCS)


def _prepare(root: Path, *args: str) -> None:
    """`energon prepare ROOT ...`, non-interactively, in this process (Energon's own click command)."""
    from megatron.energon.tools.prepare import command

    result = CliRunner().invoke(
        command, [str(root), "--non-interactive", "--no-progress", "--num-workers", "1", *args]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)


def _write_dataset(root: Path) -> None:
    root.mkdir(parents=True)
    for si in range(TRAIN_SHARDS + 1):
        with wds.TarWriter(str(root / f"shard-{si:06d}.tar")) as w:
            for i in range(si * PER_SHARD, (si + 1) * PER_SHARD):
                text, domain = DOCS[i]
                w.write({"__key__": f"{i:010d}", "txt": text, "json": {"domain": domain, "i": i}})
    _prepare(
        root,
        "--split-parts",
        "train:shard-00000[0-2].tar",
        "--split-parts",
        "val:shard-000003.tar",
        "--sample-type",
        "TextSample",
        "--field-map",
        '{"text": "txt"}',
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("energon") / "ds"
    _write_dataset(root)
    return root


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared dataset, for tests that damage it."""
    return Path(shutil.copytree(prepared, tmp_path / "ds"))


@pytest.fixture(scope="module")
def tok():
    from mates_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer()


def _expected_tokens(tok, text: str) -> np.ndarray:
    """What `mates-megatron prepare` writes for a document: no special tokens, then the eod id."""
    from mates_megatron.data.tokenizer import eod_token_id

    return np.asarray([*tok(text, add_special_tokens=False)["input_ids"], eod_token_id(tok)], dtype=np.int32)


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar*"))}


def test_energon_prepare_wrote_its_index(prepared):
    """What the pool relies on: Energon's metadata, and a .tar.idx beside each shard."""
    meta = prepared / ".nv-meta"
    assert {"dataset.yaml", "split.yaml", ".info.json", "index.sqlite"} <= {p.name for p in meta.iterdir()}
    counts = json.loads((meta / ".info.json").read_text())["shard_counts"]
    assert counts == {f"shard-{i:06d}.tar": PER_SHARD for i in range(TRAIN_SHARDS + 1)}
    assert all((prepared / f"shard-{i:06d}.tar.idx").is_file() for i in range(TRAIN_SHARDS + 1))


def test_reads_the_split_in_energon_order(prepared, tok):
    before = _digest(prepared)
    pool = POOLS.get("energon")(
        prepared, seq_length=SEQ, tokenizer=tok, split="train", domain_field="json[domain]"
    )
    n = PER_SHARD * TRAIN_SHARDS
    assert pool.num_candidates == len(pool) == n
    assert pool.domains == list(DOMAINS)
    assert pool.domain_ids(np.arange(6)).tolist() == [0, 1, 2, 0, 1, 2]
    for gid in range(n):
        text, _ = DOCS[gid]
        assert pool.text(gid) == text
        expected = _expected_tokens(tok, text)
        assert np.array_equal(pool.tokens(gid), expected)
        s = pool.training_sample(gid)
        row = np.zeros(SEQ + 1, dtype=np.int64)
        row[: min(len(expected), SEQ + 1)] = expected[: SEQ + 1]
        assert np.array_equal(s["tokens"], row[:-1]) and np.array_equal(s["labels"], row[1:])
        assert s["loss_mask"].sum() == min(len(expected), SEQ + 1) - 1
        assert np.array_equal(s["position_ids"], np.arange(SEQ))
    # The same samples, in the same order, as Energon's own loader yields for the split.
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset

    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    loader = get_loader(get_val_dataset(prepared, split_part="train", worker_config=wc, batch_size=None))
    assert [s.text for s in loader] == [pool.text(g) for g in range(n)]

    val = EnergonPool(prepared, seq_length=SEQ, tokenizer=tok, split="val", domain_field="__shard__")
    assert val.num_candidates == PER_SHARD and val.text(0) == DOCS[3 * PER_SHARD][0]
    assert val.domains == ["shard-000003.tar"]
    assert EnergonPool(prepared, seq_length=SEQ, tokenizer=tok).domain_ids(np.arange(3)).tolist() == [-1] * 3
    # Pickles without its open tars and Energon's lambdas; reads the same after.
    import pickle

    again = pickle.loads(pickle.dumps(pool))
    assert again.text(30) == pool.text(30) and again.fingerprint() == pool.fingerprint()
    # Selections go beside the shards; the tars and Energon's index are never rewritten.
    store = pool.selection_store("run1")
    store.save(0, np.array([3, 1, 2]))
    assert store.load(0).tolist() == [3, 1, 2] and store.dir == prepared / "mates" / "run1"
    assert _digest(prepared) == before
    shutil.rmtree(prepared / "mates")


def test_excluded_shards_and_samples_are_not_candidates(copy, tok):
    split = copy / ".nv-meta" / "split.yaml"
    fp = EnergonPool(copy, seq_length=SEQ, tokenizer=tok).fingerprint()
    # Energon's split.yaml syntax: a shard, or SHARD/KEY for one sample.
    split.write_text(
        split.read_text().replace(
            "exclude: []", "exclude:\n- shard-000000.tar\n- shard-000001.tar/0000000030"
        )
    )
    pool = EnergonPool(copy, seq_length=SEQ, tokenizer=tok, domain_field="json[domain]")
    kept = [i for i in range(PER_SHARD, 3 * PER_SHARD) if i != 30]
    assert pool.num_candidates == len(kept)
    assert [pool.text(g) for g in range(len(kept))] == [DOCS[i][0] for i in kept]
    assert pool.domains[pool.domain_ids(np.array([6]))[0]] == DOCS[31][1]
    assert pool.fingerprint() != fp


def test_fingerprint_follows_the_index_not_the_prepare(copy, tok):
    fp = EnergonPool(copy, seq_length=SEQ, tokenizer=tok).fingerprint()
    assert fp.startswith("energon:")
    assert EnergonPool(copy, seq_length=SEQ, tokenizer=tok, split="val").fingerprint() != fp
    _prepare(  # the same shards prepared again (a new index.uuid): the same pool
        copy,
        "--force-overwrite",
        "--split-parts",
        "train:shard-00000[0-2].tar",
        "--split-parts",
        "val:shard-000003.tar",
        "--sample-type",
        "TextSample",
        "--field-map",
        '{"text": "txt"}',
    )
    assert EnergonPool(copy, seq_length=SEQ, tokenizer=tok).fingerprint() == fp
    # A shard rewritten with one document longer, then re-prepared: another pool.
    with wds.TarWriter(str(copy / "shard-000001.tar")) as w:
        for i in range(PER_SHARD, 2 * PER_SHARD):
            w.write({"__key__": f"{i:010d}", "txt": DOCS[i][0] + (" more" * 200 if i == 30 else "")})
    _prepare(copy, "--tar-index-only")
    assert EnergonPool(copy, seq_length=SEQ, tokenizer=tok).fingerprint() != fp


def test_not_prepared_missing_split_and_missing_fields(tmp_path, copy, tok):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(copy / "shard-000000.tar", raw)
    with pytest.raises(
        PoolError, match=rf"{raw} is not an Energon-prepared WebDataset.*`energon prepare {raw}`"
    ):
        EnergonPool(raw, seq_length=SEQ, tokenizer=tok)
    with pytest.raises(PoolError, match="is not an Energon-prepared WebDataset"):
        EnergonPool(tmp_path / "nowhere", seq_length=SEQ, tokenizer=tok)
    with pytest.raises(
        PoolError, match=r"split.yaml has no split 'dev' \(it has train, val\).*--split-parts 'dev:"
    ):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok, split="dev")
    with pytest.raises(PoolError, match=r"has no text field 'caption' \(it has text\).*pool.text_field"):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok, text_field="caption")
    with pytest.raises(
        PoolError, match=r"sample 0 of shard .*shard-000000.tar has no domain field 'json\[topic\]'"
    ):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok, domain_field="json[topic]")
    with pytest.raises(PoolError, match="pass tokenizer="):
        EnergonPool(copy, seq_length=SEQ, tokenizer=None)
    (copy / ".nv-meta" / "dataset.yaml").unlink()
    with pytest.raises(PoolError, match=r"dataset.yaml not found.*--sample-type TextSample"):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok)


def test_crude_dataset_reads_parts_in_energon_field_syntax(copy, tok):
    (copy / ".nv-meta" / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
    )
    pool = EnergonPool(copy, seq_length=SEQ, tokenizer=tok, text_field="txt", domain_field="json[domain]")
    assert pool.text(5) == DOCS[5][0] and pool.domains == list(DOMAINS)
    with pytest.raises(PoolError, match=r"CrudeSample has no text field 'text' \(it has json, txt\)"):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok)


def test_damaged_shards_are_named_with_the_fix(copy, tok):
    (copy / "shard-000001.tar.idx").unlink()
    with pytest.raises(PoolError, match=r"shard-000001.tar has no Energon index.*energon prepare"):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok)
    _prepare(copy, "--tar-index-only")
    tar = copy / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:4096])
    with pytest.raises(
        PoolError, match=r"shard-000002.tar is shorter than its .tar.idx says.*energon prepare"
    ):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok)
    tar.unlink()
    with pytest.raises(PoolError, match=r"shard-000002.tar of split 'train' is missing"):
        EnergonPool(copy, seq_length=SEQ, tokenizer=tok)


def test_config_names_the_pool_and_the_tokenizer_it_needs(prepared):
    from mates_megatron.config import SelectionConfig

    with pytest.raises(ValueError, match="shards is required with pool 'energon'"):
        SelectionConfig(pool="energon", imports=["mates_megatron.pool.energon_pool"])
    sel = SelectionConfig(pool="energon", pool_options={"shards": str(prepared)})
    assert sel.needs_text_decoding  # hosts pass their pretraining tokenizer: this pool tokenises text


def test_missing_extra_names_the_install(monkeypatch):
    import sys

    from mates_megatron.pool import energon_pool

    monkeypatch.setitem(sys.modules, "megatron.energon", None)
    with pytest.raises(ImportError, match=r"pip install 'mates-megatron\[energon\]'"):
        energon_pool.require_energon()


# -- training through the sampler, with an exact resume -------------------------------------------------

ITERS, EVERY, STOP = 8, 4, 6  # the stop is inside round 1


def _train_three_ways(prefix: str, root: str, ckpt: str):
    """One process (TP=DP=1): uninterrupted, stopped at STOP with a checkpoint, resumed from it."""
    from megatron.core import parallel_state

    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    def run(**overrides):
        parallel_state.destroy_model_parallel()  # several Trainers in one process
        cfg = {
            "data_prefix": prefix,
            "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_length": SEQ},
            "parallel": {"cpu": True},
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "train_iters": ITERS,
            "lr": 3e-3,
            "lr_warmup_iters": 1,
            "log_interval": 100,
            "seed": 5,
            "selection": {
                "pool": {"kind": "energon", "shards": root, "domain_field": "json[domain]"},
                "imports": ["mates_megatron.pool.energon_pool"],
                "select_every": EVERY,
                "selection_ratio": 0.5,
                "selector": "random",
                "seed": 11,
                "run_name": "test",
            },
            **overrides,
        }
        trainer = build_trainer(build(TrainConfig, cfg, where="test"))
        served = []
        original = trainer.order.micro_batch_indices

        def record(consumed):
            batches = original(consumed)
            served.append(np.concatenate(batches).tolist())
            return batches

        trainer.order.micro_batch_indices = record
        history = trainer.train()
        return {"loss": history["loss"], "served": served, "share": trainer.hooks[0].domain_share}

    return run(), run(save=ckpt, exit_interval=STOP), run(load=ckpt)


def test_trains_from_energon_pool_through_mates_sampler_and_resumes(prepared, tok, tmp_path):
    from mates_megatron.compat.spawn import run_on_ranks
    from mates_megatron.data.tokenizer import default_tokenizer_path, eod_token_id

    # The demo host reads the tokenizer (path, vocabulary, eod) from PREFIX.meta.json; no .bin/.idx needed.
    prefix = tmp_path / "train"
    meta = {"vocab_size": len(tok), "eod_id": eod_token_id(tok), "tokenizer": str(default_tokenizer_path())}
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))
    root = tmp_path / "ds"
    shutil.copytree(prepared, root)
    before = _digest(root)

    [(full, stopped, resumed)] = run_on_ranks(
        _train_three_ways, 1, str(prefix), str(root), str(tmp_path / "ck")
    )
    served = full["served"]
    assert len(served) == ITERS and stopped["served"] == served[:STOP]
    for r in range(ITERS // EVERY):
        ids = [i for step in served[r * EVERY : (r + 1) * EVERY] for i in step]
        assert len(ids) == len(set(ids)) == EVERY * 4  # none served twice in a round
    assert resumed["served"] == served[STOP:]
    # Bitwise (floats compared with ==): the resumed history is the checkpoint's first STOP steps + its own.
    assert resumed["loss"] == full["loss"] and len(full["loss"]) == ITERS
    assert stopped["loss"] == full["loss"][:STOP]
    assert full["loss"][-1] < full["loss"][0]
    assert set(full["share"]) == {0, 1} and all(set(s) == set(DOMAINS) for s in full["share"].values())

    # Read in place: the tars and Energon's index are untouched; the selections sit beside them.
    assert _digest(root) == before
    from mates_megatron.pool.manifest import SelectionStore

    store = SelectionStore(root, "test")
    assert store.rounds() == [0, 1]
    assert sorted(store.load(1).tolist()) == sorted(i for s in served[EVERY:] for i in s)
