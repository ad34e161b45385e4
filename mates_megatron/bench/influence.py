"""`mates-megatron bench influence`: fit and predict throughput of the embedded default influence model."""

from __future__ import annotations

import time

import numpy as np
import torch


def bench_influence(texts: list[str] | None = None, *, n: int = 256, max_length: int = 512) -> dict:
    """Train (MSE on random targets) and predict on ``n`` embedded-corpus texts; samples/s and tokens/s."""
    from mates_megatron.influence.config import InfluenceConfig
    from mates_megatron.influence.encoder import EncoderRegressor
    from mates_megatron.influence.finetune import predict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if texts is None:
        texts = _embedded_texts(n)
    model = EncoderRegressor(InfluenceConfig(max_length=max_length, max_chunks=2)).to(device)
    target = torch.tensor(
        np.random.default_rng(0).normal(size=len(texts)), dtype=torch.float32, device=device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    bs = 16
    t0 = time.perf_counter()
    for s in range(0, len(texts), bs):
        ids, mask = model.encode_texts(texts[s : s + bs])
        loss = torch.mean((model(ids.to(device), mask.to(device)) - target[s : s + bs]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_rate = len(texts) / (time.perf_counter() - t0)
    tokens = int(sum(model.encode_texts([t])[1].sum() for t in texts))
    t0 = time.perf_counter()
    predict(model, texts, batch_size=32, progress=False)
    dt = time.perf_counter() - t0
    return {
        "samples": len(texts),
        "max_length": max_length,
        "train_samples_per_s": round(train_rate, 2),
        "predict_samples_per_s": round(len(texts) / dt, 2),
        "predict_tokens_per_s": round(tokens / dt, 1),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
    }


def _embedded_texts(n: int, data_dir: str = "data/embedded") -> list[str]:
    import json
    from pathlib import Path

    path = Path(data_dir) / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `mates-megatron prepare --embedded --out {data_dir}`")
    out = []
    with path.open() as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out
