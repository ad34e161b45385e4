"""`mates-lab bench influence`: the influence stage's candidates/s, end to end and encoder only, against
the encoder's FLOP bound; and the fit's throughput.

Candidates are windows of the embedded indexed dataset (``seq_length`` pretraining tokens each), read through
an ``IndexedPool`` as a round reads them: token ids decoded to text with the pretraining tokenizer, tokenised
again by the encoder's tokenizer, chunked, encoded and scored (``finetune.predict``). Measured:

- ``end_to_end_candidates_per_s``: that whole path, for each ``loader_workers`` setting;
- ``host_candidates_per_s``: its host part alone (read, decode, tokenise, chunk): what the loader can supply;
- ``token_embeddings_candidates_per_s``: the CPU demo's ridge features (mean input embeddings) end to end;
- ``pretokenised_candidates_per_s``: the encoder alone, its inputs already chunked and on the device;
- ``flop_bound_candidates_per_s``: the device's FLOP rate over the encoder's FLOPs per candidate
  (``TransformerShape.forward_flops_per_token`` on each chunk's real tokens): what the encoder could reach if
  it ran at that rate. The rate is a dense matmul measured on the device (bf16 where the encoder runs bf16,
  else fp32), or ``device_tflops`` when given (a datasheet figure).

Each rate is the fastest of ``repeats`` runs, and the machine's load average is recorded before and after:
on a shared CPU the figures move with it. Prediction starts its loader workers afresh each time, as a round
does, so a small ``n`` also measures their start-up.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def bench_influence(
    data: str | Path = "data/embedded",
    *,
    n: int = 256,
    seq_length: int = 1024,
    max_length: int = 512,
    max_chunks: int = 2,
    batch_size: int = 256,
    workers: Sequence[int] = (0, 2),
    fit_samples: int = 64,
    device_tflops: float | None = None,
    repeats: int = 1,
) -> dict:
    # The dataset's index cache goes to a temporary directory, never beside the data (it may be shared).
    with tempfile.TemporaryDirectory(prefix="mates-bench-influence-") as cache:
        return _bench(
            Path(data), Path(cache), n=n, seq_length=seq_length, max_length=max_length, max_chunks=max_chunks,
            batch_size=batch_size, workers=workers, fit_samples=fit_samples, device_tflops=device_tflops,
            repeats=repeats,
        )  # fmt: skip


def _bench(
    data: Path, cache: Path, *, n: int, seq_length: int, max_length: int, max_chunks: int, batch_size: int,
    workers: Sequence[int], fit_samples: int, device_tflops: float | None, repeats: int,
) -> dict:  # fmt: skip
    from mates_megatron.cost import TransformerShape
    from mates_megatron.influence.config import InfluenceConfig, RidgeConfig
    from mates_megatron.influence.encoder import EncoderRegressor

    load_before = os.getloadavg()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    cfg = InfluenceConfig(max_length=max_length, max_chunks=max_chunks, predict_batch_size=batch_size)
    texts = _candidate_texts(data, cache, n, seq_length, tokenizer_path=cfg.resolved_path())
    torch.manual_seed(0)
    net = EncoderRegressor(cfg).to(device).eval()
    torch.nn.init.normal_(net.head.weight, std=0.05)  # a head that tells candidates apart

    shape = TransformerShape.from_encoder_dir(cfg.resolved_path())
    encoded = [net.chunker.encode(texts[s : s + batch_size]) for s in range(0, n, batch_size)]
    real = [int(m.sum()) for b in encoded for m in b.attention_mask.view(-1, b.attention_mask.shape[-1])]
    flops = sum(shape.forward_flops_per_token(t, logits=False) * t for t in real if t) / n
    padded = sum(b.keep.numel() * b.input_ids.shape[-1] for b in encoded) / n
    rate, rate_source = max(_device_rate(device, net, device_tflops) for _ in range(max(repeats, 1)))

    out = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "candidates": n,
        "seq_length": seq_length,
        "max_length": max_length,
        "max_chunks": max_chunks,
        "predict_batch_size": batch_size,
        "encoder_tokens_per_candidate": round(sum(real) / n, 1),
        "padded_tokens_per_candidate": round(padded, 1),
        "encoder_flops_per_candidate": flops,
        "device_flops_per_s": rate,
        "device_flops_source": rate_source,
        "flop_bound_candidates_per_s": round(rate / flops, 2),
        "repeats": repeats,
        "pretokenised_candidates_per_s": _rate(n, repeats, _encoder_seconds, net, encoded, device),
    }
    out["end_to_end_candidates_per_s"] = {}
    out["host_candidates_per_s"] = {}
    out["token_embeddings_candidates_per_s"] = {}
    static = EncoderRegressor(
        InfluenceConfig(
            max_length=max_length, max_chunks=max_chunks, ridge=RidgeConfig(features="token_embeddings")
        )
    ).to(device)
    for w in workers:
        e2e = _rate(n, repeats, _predict_seconds, net, texts, batch_size, w)
        out["end_to_end_candidates_per_s"][str(w)] = e2e
        host = _rate(n, repeats, _host_seconds, net, texts, batch_size, w, device)
        out["host_candidates_per_s"][str(w)] = host
        static_rate = _rate(n, repeats, _static_seconds, static, texts, batch_size, w)
        out["token_embeddings_candidates_per_s"][str(w)] = static_rate
    out["encoder_utilisation"] = round(
        out["pretokenised_candidates_per_s"] / out["flop_bound_candidates_per_s"], 3
    )
    if fit_samples:
        out["train_samples_per_s"] = round(_train_rate(net, texts[:fit_samples], device), 2)
    out["load_average_before"] = [round(x, 2) for x in load_before]
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _candidate_texts(data: Path, cache: Path, n: int, seq_length: int, *, tokenizer_path) -> Sequence[str]:
    """The first ``n`` candidates of an ``IndexedPool`` over ``data/train``, read (and decoded) on access."""
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.pool.base import CandidateTexts
    from mates_megatron.pool.indexed_pool import IndexedPool
    from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset

    prefix = data / "train"
    if not Path(f"{prefix}.bin").is_file():
        raise FileNotFoundError(f"{prefix}.bin not found: run `mates-lab embedded --out {data}`")
    info = TokenizerInfo.from_meta(prefix)
    ds = build_gpt_dataset(
        prefix, seq_length=seq_length, num_samples=n, seed=0, tokenizer=info, cache_dir=cache
    )
    pool = IndexedPool(ds, prefix, tokenizer=load_tokenizer(info.path or tokenizer_path))
    if len(pool) < n:
        raise ValueError(
            f"{prefix} holds {len(pool)} candidates of {seq_length} tokens: ask for fewer (--samples)"
        )
    return CandidateTexts(pool, np.arange(n))


def _device_rate(device: torch.device, net, given_tflops: float | None) -> tuple[float, str]:
    """FLOP/s of a dense matmul on ``device`` in the encoder's compute dtype, or ``given_tflops``."""
    if given_tflops:
        return given_tflops * 1e12, "given (--device-tflops)"
    bf16 = device.type == "cuda" and net.cfg.bf16 and torch.cuda.is_bf16_supported()
    dtype, size = (torch.bfloat16, 8192) if bf16 else (torch.float32, 8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for _ in range(5):
            a @ b
        _sync(device)
        reps += 5
    rate = 2.0 * size**3 * reps / (time.perf_counter() - t0)
    return (
        rate,
        f"measured: {str(dtype).removeprefix('torch.')} matmul {size}x{size}, {torch.get_num_threads()} threads",
    )


def _rate(n: int, repeats: int, seconds, *args) -> float:
    """``n`` over the fastest of ``repeats`` runs of ``seconds(*args)`` (a shared machine only slows runs down)."""
    return round(n / min(seconds(*args) for _ in range(max(repeats, 1))), 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _encoder_seconds(net, encoded: list, device: torch.device) -> float:
    """The encoder alone over chunked inputs already on the device (after one warm-up batch)."""
    on_device = [b.to(device) for b in encoded]
    net(on_device[0].input_ids[:1], on_device[0].attention_mask[:1])
    _sync(device)
    t0 = time.perf_counter()
    for b in on_device:
        net(b.input_ids, b.attention_mask, b.keep)
    _sync(device)
    return time.perf_counter() - t0


def _predict_seconds(net, texts, batch_size: int, workers: int) -> float:
    from mates_megatron.influence.finetune import predict

    net.cfg.loader_workers = workers
    t0 = time.perf_counter()
    predict(net, texts, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0


def _host_seconds(net, texts, batch_size: int, workers: int, device: torch.device) -> float:
    from mates_megatron.influence.loader import batches, spans

    t0 = time.perf_counter()
    for _ in batches(
        texts, spans(0, len(texts), batch_size), net.chunker.encode, workers=workers, device=device
    ):
        pass
    _sync(device)
    return time.perf_counter() - t0


def _static_seconds(net, texts, batch_size: int, workers: int) -> float:
    from mates_megatron.influence.loader import spans
    from mates_megatron.influence.ridge import streamed_features

    net.cfg.loader_workers = workers
    t0 = time.perf_counter()
    for _ in streamed_features(net, texts, spans(0, len(texts), batch_size)):
        pass
    return time.perf_counter() - t0


def _train_rate(net, texts: Sequence[str], device: torch.device) -> float:
    """Samples/s of fine-tuning steps (MSE on random targets, 16 texts a step, AdamW)."""
    target = torch.tensor(
        np.random.default_rng(0).normal(size=len(texts)), dtype=torch.float32, device=device
    )
    opt = torch.optim.AdamW(net.parameters(), lr=5e-5)
    net.train()
    t0 = time.perf_counter()
    for s in range(0, len(texts), 16):
        b = net.chunker.encode(texts[s : s + 16]).to(device)
        loss = torch.mean((net(b.input_ids, b.attention_mask, b.keep) - target[s : s + 16]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    net.eval()
    return len(texts) / (time.perf_counter() - t0)
