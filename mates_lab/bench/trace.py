"""`mates-lab bench trace`: plant facts and leaked reference examples in the embedded pool, train the
demo model on it, then trace the facts and the leaks back with every method.

The pool: ``background`` pieces of about 240 characters cut from the embedded corpus (every domain), with
``facts`` made-up facts planted in 3 supporting documents each and their entities in 3 distractor documents
each (``mates_lab/planted.py``), and ``leaks`` reference examples (cut to fit the window) copied in twice. The
model: the CPU demo's GPT (4 layers, 128 wide, TP=2), trained on that pool. Judged per method: recall@10
of the supporting documents, the F1 of its supportive set (FASTTRACK's verdicts; the others' top 10, and
their best top-k over k in 1..10 beside it), seconds per query over the whole pool (the 20 fact queries
traced together, and one query alone), and recall@10 of the leaked copies. Every stage is kept in
``--work`` and skipped when done (a killed bench resumes).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL = {
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "seq_length": 128,
    "vocab_size": 30522,
}
METHODS = ("bm25", "gradient", "forward-inf", "fasttrack")


def background_pieces(corpus: Path, n: int, seed: int, piece_chars: int = 240) -> list[tuple[str, str]]:
    """``n`` (text, domain) pieces of about ``piece_chars`` characters, cut at spaces, drawn at random."""
    pieces = []
    for line in corpus.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        text = r["text"]
        lo = 0
        while lo < len(text) - piece_chars // 2:
            hi = text.rfind(" ", lo + piece_chars // 2, lo + piece_chars)
            hi = hi if hi > lo else lo + piece_chars
            pieces.append((text[lo:hi].strip(), r.get("domain", "default")))
            lo = hi
    pieces = [p for p in pieces if p[0]]
    if len(pieces) < n:
        raise ValueError(f"{corpus} gives {len(pieces)} pieces, {n} asked for: lower --background")
    return random.Random(seed).sample(pieces, n)


def leak_examples(reference: Path, n: int, tokenizer, budget: int, seed: int) -> list[dict]:
    """``n`` reference examples, each context cut from the left to fit ``budget`` tokens with its target."""
    rows = [json.loads(line) for line in reference.read_text().splitlines() if line.strip()]
    out = []
    for r in random.Random(seed).sample(rows, n):
        ctx = r["context"]
        n_tgt = len(tokenizer(r["target"], add_special_tokens=False)["input_ids"])
        while len(tokenizer(ctx, add_special_tokens=False)["input_ids"]) + n_tgt > budget:
            ctx = ctx[len(ctx) // 8 or 1 :]
        out.append({"context": ctx, "target": r["target"]})
    return out


def build_pool(data: Path, work: Path, *, background: int, facts: int, leaks: int, seed: int) -> dict:
    """The planted corpus, prepared into ``work/data`` (indexed + shards), and the query files."""
    from mates_lab.planted import plant
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus
    from mates_megatron.data.tokenizer import load_tokenizer

    plan = work / "planted.json"
    settings = {"background": background, "facts": facts, "leaks": leaks, "seed": seed}
    if plan.is_file():
        done = json.loads(plan.read_text())
        if done["settings"] != settings:
            raise ValueError(
                f"{work} holds a bench built with {done['settings']}, not {settings}: pass another --work"
            )
        return done
    pieces = background_pieces(data / "corpus.jsonl", background, seed)
    tok = load_tokenizer(None)
    leaked = leak_examples(data / "reference.jsonl", leaks, tok, MODEL["seq_length"] - 8, seed)
    docs, planted, leak_plan = plant(
        [t for t, _ in pieces], facts=facts, supports=3, distractors=3, leaks=leaked, leak_copies=2, seed=seed
    )
    domain_of = {t: d for t, d in pieces}
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": d, "domain": domain_of.get(d, "planted")}) + "\n" for d in docs)
    )
    prepared = prepare_corpus(PrepareConfig(input=corpus, output_prefix=work / "data" / "train"))
    for name, items in (("facts", planted), ("leaks", leak_plan), ("one_fact", planted[:1])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(x.query()) + "\n" for x in items))
    out = {
        "settings": settings, "prefix": str(prepared.prefix), "shards": str(prepared.shards_dir),
        "docs": len(docs),
        "gold": {
            "facts": [list(f.supporting) for f in planted],
            "distractors": [list(f.distractors) for f in planted],
            "leaks": [list(x.copies) for x in leak_plan],
        },
    }  # fmt: skip
    plan.write_text(json.dumps(out))
    return out


def train(work: Path, prefix: str, *, steps: int, seed: int) -> Path:
    from mates_megatron.launch import run_config

    ckpt = work / "ckpt"
    run = {
        "data_prefix": prefix, "model": MODEL,
        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "cpu": not torch.cuda.is_available()},
        "micro_batch_size": 8, "global_batch_size": 16, "train_iters": steps, "lr": 0.002, "min_lr": 0.0002,
        "lr_warmup_iters": 20, "lr_decay_style": "cosine", "weight_decay": 0.1, "clip_grad": 1.0,
        "seed": seed, "log_interval": 50, "save": str(ckpt), "load": str(ckpt), "save_interval": steps,
    }  # fmt: skip
    run_config(run, work)
    return work / "config.yaml"


def trace(work: Path, config: Path, shards: str, method: str, queries: str, options: dict) -> dict:
    from mates_megatron.trace.run import trace_command

    out = work / f"trace_{method}_{queries}.jsonl"
    meta = out.with_name(out.name + ".meta.json")
    if not meta.is_file():
        argv = ["--method", method, "--shards", shards, "--queries", str(work / f"{queries}.jsonl"),
                "--out", str(out), "--config", str(config), "--load", str(work / "ckpt"),
                "--options", json.dumps(options)]  # fmt: skip
        if trace_command(argv):
            raise RuntimeError(f"trace --method {method} on {queries} failed")
    ranked = {}
    verdicts = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        ranked[r["id"]] = r["ids"]
        verdicts[r["id"]] = r.get("supportive")
    return {"ranked": ranked, "verdicts": verdicts, "meta": json.loads(meta.read_text())}


def bench_trace(
    data: Path, work: Path, *, background: int = 2000, facts: int = 20, leaks: int = 5, steps: int = 300,
    seed: int = 0, options: dict[str, dict] | None = None,
) -> dict[str, Any]:  # fmt: skip
    from mates_megatron.trace.metrics import precision_recall_f1, recall_at_k, summarize

    t0 = time.perf_counter()
    pool = build_pool(data, work, background=background, facts=facts, leaks=leaks, seed=seed)
    config = train(work, pool["prefix"], steps=steps, seed=seed)
    gold = pool["gold"]
    result: dict[str, Any] = {
        "pool_documents": pool["docs"], "facts": facts, "supporting_per_fact": 3, "distractors_per_fact": 3,
        "leaks": leaks, "train_steps": steps, "seed": seed,
        "recall_at_10": {}, "seconds_per_query": {}, "leakage_recall_at_10": {}, "distractor_share_of_top_10": {},
        "seconds_one_query": {},
    }  # fmt: skip
    for method in METHODS:
        opts = (options or {}).get(method, {})
        fact_run = trace(work, config, pool["shards"], method, "facts", opts)
        ids = [f"fact-{i}" for i in range(facts)]
        ranked = [fact_run["ranked"][q] for q in ids]
        if method == "fasttrack":
            verdicts = [fact_run["verdicts"][q] for q in ids]
        else:
            verdicts = [r[:10] for r in ranked]
        s = summarize(ranked, verdicts, gold["facts"], 10)
        result["recall_at_10"][method] = s["recall_at_10"]
        key = method.replace("-", "_")
        result[f"{key}_f1"] = s["f1"]
        result[f"{key}_precision"] = s["precision"]
        result[f"{key}_recall"] = s["recall"]
        if method != "fasttrack":
            result[f"{key}_f1_best_k"] = max(
                (
                    float(
                        np.mean(
                            [
                                precision_recall_f1(r[:k], g)[2]
                                for r, g in zip(ranked, gold["facts"], strict=True)
                            ]
                        )
                    ),
                    k,
                )
                for k in range(1, 11)
            )
        result["distractor_share_of_top_10"][method] = float(
            np.mean(
                [len(set(r[:10]) & set(d)) / 10 for r, d in zip(ranked, gold["distractors"], strict=True)]
            )
        )
        result["seconds_per_query"][method] = fact_run["meta"]["seconds_per_query"]
        if method == "fasttrack":
            result["fasttrack_index_seconds"] = fact_run["meta"]["record"].get("index_seconds")
            result["fasttrack_routed_candidates"] = float(
                np.mean(fact_run["meta"]["record"]["routed_candidates"])
            )
        # Latency of one query alone: the regime Forward-INF is built for (few queries, a huge pool).
        one = trace(work, config, pool["shards"], method, "one_fact", opts)
        result["seconds_one_query"][method] = one["meta"]["seconds_per_query"]
        leak_run = trace(work, config, pool["shards"], method, "leaks", opts)
        lranked = [leak_run["ranked"][f"leak-{j}"] for j in range(leaks)]
        result["leakage_recall_at_10"][method] = float(
            np.mean([recall_at_k(r, g, 10) for r, g in zip(lranked, gold["leaks"], strict=True)])
        )
    result["seconds"] = time.perf_counter() - t0
    return result
