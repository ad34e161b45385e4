"""The encoder component (``mates_megatron.encoder``): the embeddings it gives are the ones the influence
model's network gives for the same settings (the construction the OT scorers, FASTTRACK and Projektor used
before the component existed), its caches, its config's errors, and its one description with
``InfluenceConfig``."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from mates_megatron.config import SelectionConfig
from mates_megatron.encoder import Encoder, EncoderConfig
from mates_megatron.influence.config import ENCODER_FIELDS, InfluenceConfig
from mates_megatron.probe.reference import ReferenceFile

TEXTS = [
    "the cat sat on the mat",
    "bond yields climbed after the meeting",
    "def add(a, b): return a + b",
    " ".join(["a long text that needs more than one chunk of sixteen tokens"] * 4),
]


def _old_embeddings(influence: InfluenceConfig, texts, *, features, batch_size, max_length):
    """What the removed ``scorers.embedding.Embedder`` computed: the influence config with the scorer's
    features and max_length replaced, its EncoderRegressor on the resolved device, ``embed_texts``."""
    from mates_megatron.influence.encoder import EncoderRegressor, resolve_device
    from mates_megatron.ot.valuation import embed_texts

    cfg = replace(influence, ridge=replace(influence.ridge, features=features))
    if max_length is not None:
        cfg = replace(cfg, max_length=max_length)
    net = EncoderRegressor(cfg).to(resolve_device(cfg.device, None))
    return embed_texts(net, texts, batch_size=batch_size)


@pytest.mark.parametrize("features", ["encoder", "token_embeddings"])
def test_embeddings_are_the_old_constructions_bit_for_bit(features):
    # The offline tools' construction: the default influence settings, their own max_length.
    old = _old_embeddings(InfluenceConfig(), TEXTS, features=features, batch_size=3, max_length=16)
    new = Encoder(EncoderConfig(max_length=16, batch_size=3, features=features)).embed(TEXTS)
    assert new.dtype == np.float32 and new.shape == old.shape
    np.testing.assert_array_equal(new, old)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, rtol=1e-5)


def test_a_scorers_encoder_is_the_influence_models_with_its_options():
    # The OT scorers' construction: the influence model's encoder settings (here not the defaults) read
    # with the scorer's features, batch_size and max_length (None: the influence model's).
    influence = InfluenceConfig(max_length=24, max_chunks=1, bf16=False)
    for max_length in (None, 16):
        old = _old_embeddings(influence, TEXTS, features="encoder", batch_size=2, max_length=max_length)
        cfg = EncoderConfig.from_influence(influence, features="encoder", batch_size=2, max_length=max_length)
        assert (cfg.max_length, cfg.max_chunks, cfg.bf16) == (max_length or 24, 1, False)
        np.testing.assert_array_equal(Encoder(cfg).embed(TEXTS), old)


def test_the_scorer_options_are_the_encoder_config():
    options = {"features": "token_embeddings", "batch_size": 5, "max_chunks": 3, "device": "cpu", "k": 4}
    sel = SelectionConfig(scorer="lookalike", selector="topk", scorer_options=options)
    scorer = sel.build_scorer()
    assert scorer.encoder.config is sel.scorer_config and scorer.config.k == 4
    assert EncoderConfig.from_influence(
        InfluenceConfig(max_chunks=3, device="cpu"), features="token_embeddings", batch_size=5
    ) == EncoderConfig(**{f: getattr(scorer.config, f) for f in EncoderConfig.__dataclass_fields__})


def test_the_flat_influence_section_of_earlier_releases_still_sets_an_ot_scorers_encoder():
    from mates_megatron.configio import build

    flat = {"scorer": "lookalike", "selector": "topk", "scorer_options": {"max_length": 64},
            "influence": {"model": "ridge", "max_chunks": 3, "max_length": 24, "bf16": False}}  # fmt: skip
    with pytest.warns(FutureWarning, match=r"influence is read for one more release for scorer 'lookalike'"):
        old = build(SelectionConfig, flat, where="old")
    new = build(
        SelectionConfig,
        {
            "scorer": {"kind": "lookalike", "max_length": 64, "max_chunks": 3, "bf16": False},
            "selector": "topk",
        },
        where="new",
    )
    assert old == new and old.scorer_config == new.scorer_config
    assert (new.scorer_config.max_length, new.scorer_config.max_chunks) == (64, 3)  # the scorer's own won


def test_one_description_with_the_influence_config():
    # Every encoder field of InfluenceConfig is an EncoderConfig field with the same default, and the
    # round trip through influence_config() keeps them.
    enc, inf = EncoderConfig(), InfluenceConfig()
    assert set(ENCODER_FIELDS) <= {f.name for f in fields(EncoderConfig)}
    assert {n: getattr(enc, n) for n in ENCODER_FIELDS} == {n: getattr(inf, n) for n in ENCODER_FIELDS}
    cfg = EncoderConfig(model_path="/m", max_length=64, max_chunks=3, device="cpu", bf16=False,
                        features="token_embeddings")  # fmt: skip
    back = cfg.influence_config()
    assert {n: getattr(back, n) for n in ENCODER_FIELDS} == {n: getattr(cfg, n) for n in ENCODER_FIELDS}
    assert back.ridge.features == "token_embeddings"
    assert EncoderConfig.from_influence(back, features="token_embeddings", batch_size=32) == cfg


class _Pool:
    def __init__(self, texts):
        self.texts = list(texts)

    def __len__(self):
        return len(self.texts)

    @property
    def num_candidates(self):
        return len(self.texts)

    def text(self, gid):
        return self.texts[gid]


def _counting(encoder: Encoder) -> list[list[str]]:
    """Replace ``encoder.embed`` by a cheap one (one-hot of the text's length) that records its calls."""
    calls: list[list[str]] = []

    def embed(texts):
        texts = list(texts)
        calls.append(texts)
        out = np.zeros((len(texts), 512), np.float32)
        out[np.arange(len(texts)), [len(t) for t in texts]] = 1.0
        return out

    encoder.embed = embed
    return calls


def test_candidates_are_embedded_once_per_id_of_the_last_call():
    enc = Encoder(EncoderConfig())
    calls = _counting(enc)
    pool = _Pool(TEXTS)
    first = enc.embed_candidates(pool, np.array([2, 0], dtype=np.int32))
    again = enc.embed_candidates(pool, np.array([0, 1, 2], dtype=np.int32))
    assert calls == [[TEXTS[2], TEXTS[0]], [TEXTS[1]]]  # the second call embeds only id 1
    np.testing.assert_array_equal(again[[2, 0]], first)
    assert again[1, len(TEXTS[1])] == 1.0
    # Only the last call's ids are kept (the cache does not grow with the pool): id 0 is embedded again.
    enc.embed_candidates(pool, np.array([3], dtype=np.int32))
    enc.embed_candidates(pool, np.array([0, 3], dtype=np.int32))
    assert calls[2:] == [[TEXTS[3]], [TEXTS[0]]] and set(enc._cache) == {0, 3}


def test_the_reference_is_embedded_once_per_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"context": "the cat ", "target": "sat"}) + "\n")
    b.write_text(json.dumps({"text": "a bank"}) + "\n")
    enc = Encoder(EncoderConfig())
    calls = _counting(enc)
    y = enc.embed_reference(str(a), scorer="lava")
    # The same file as a Path or as the host's reference object (anything with .path): not embedded again.
    np.testing.assert_array_equal(enc.embed_reference(a, scorer="lava"), y)
    np.testing.assert_array_equal(enc.embed_reference(ReferenceFile(str(a)), scorer="lava"), y)
    assert calls == [["the cat sat"]]
    enc.embed_reference(b, scorer="lava")
    assert calls == [["the cat sat"], ["a bank"]]
    with pytest.raises(ValueError, match="scorer 'lava' fits toward a reference set: the host has none"):
        enc.embed_reference(None, scorer="lava")


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError) as e:
        EncoderConfig(features="bag")
    assert str(e.value) == "EncoderConfig.features='bag': use 'encoder' or 'token_embeddings'"
    with pytest.raises(ValueError, match=r"EncoderConfig.max_length=4: set max_length >= 8"):
        EncoderConfig(max_length=4)
    with pytest.raises(ValueError, match=r"EncoderConfig.max_chunks=0: set max_chunks >= 1"):
        EncoderConfig(max_chunks=0)
    with pytest.raises(ValueError, match=r"EncoderConfig.batch_size=0: set batch_size >= 1"):
        EncoderConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"EncoderConfig.device='gpu0' is not a torch device"):
        EncoderConfig(device="gpu0")
    with pytest.raises(TypeError, match="Encoder takes an EncoderConfig, got InfluenceConfig"):
        Encoder(InfluenceConfig())


def test_no_tool_fills_a_default_selection_config_to_reach_the_encoder():
    # The encoder is built from its own config (EncoderConfig): no module builds a whole SelectionConfig()
    # for its encoder settings, and the removed Embedder is named nowhere.
    root = Path(__file__).resolve().parents[2]
    found = {
        str(p.relative_to(root)): [w for w in ("SelectionConfig()", "Embedder") if w in p.read_text()]
        for pkg in ("mates_megatron", "mates_lab")
        for p in (root / pkg).rglob("*.py")
    }
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("features", ["encoder", "token_embeddings"])
def test_loader_workers_give_the_same_embeddings(features):
    """Read and tokenised in loader processes (as Group-MATES's selector reads a shard), the batches and the
    values are those read in this process."""
    enc = Encoder(EncoderConfig(features=features, max_length=16, max_chunks=2, batch_size=3))
    np.testing.assert_array_equal(enc.embed(TEXTS, loader_workers=2), enc.embed(TEXTS))
