"""`mates-lab bench trace`: plant facts and leaked reference examples in the embedded pool, train the
demo model on it, then trace the facts and the leaks back with every method, over several seeds.

The pool: ``background`` pieces of about 240 characters cut from the embedded corpus (every domain), with
``facts`` made-up facts planted in ``supports`` documents each, their entity named with another relation
in ``distractors`` documents and with the fact's own relation but another object in ``same_relation``
documents (``mates_lab/planted.py``), and ``leaks`` reference examples (cut to fit the window) copied in
twice. The queries paraphrase the facts (``--no-paraphrase``: the planted sentence's words). The model: the
CPU demo's GPT (4 layers, 128 wide, TP=2), trained on that pool. Each method returns its top
``ranking_depth`` documents per query; ``trace_scores`` judges them: recall@10, and precision/recall/F1
of a decision rule (top-k or a score threshold) tuned on half the facts and scored on the other half;
FASTTRACK's verdicts, routing recall and oracle verifier beside them; seconds per query (facts and leaks
traced together); recall@10 of the leaked copies. Each seed plants, trains and traces in ``--work/seed-N``,
every stage kept and skipped when done (a killed bench resumes).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

MODEL = {
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "seq_length": 128,
    "vocab_size": 30522,
}
METHODS = ("bm25", "fasttrack", "gradient", "forward-inf")  # cheapest first: a short bench has the most


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


def build_pool(
    data: Path, work: Path, *, background: int, facts: int, leaks: int, seed: int, plan: dict
) -> dict:
    """The planted corpus, prepared into ``work/data`` (indexed + shards), and the query file (facts, then
    leaks). ``plan``: ``plant``'s supports, distractors, same_relation and paraphrase."""
    from mates_lab.planted import plant
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus
    from mates_megatron.data.tokenizer import load_tokenizer

    done_path = work / "planted.json"
    settings = {"background": background, "facts": facts, "leaks": leaks, "seed": seed, **plan}
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done["settings"] != settings:
            raise ValueError(
                f"{work} holds a bench built with {done['settings']}, not {settings}: pass another --work"
            )
        return done
    pieces = background_pieces(data / "corpus.jsonl", background, seed)
    tok = load_tokenizer(None)
    leaked = (
        leak_examples(data / "reference.jsonl", leaks, tok, MODEL["seq_length"] - 8, seed) if leaks else []
    )
    docs, planted, leak_plan = plant(
        [t for t, _ in pieces], facts=facts, leaks=leaked, leak_copies=2, seed=seed, **plan
    )
    domain_of = {t: d for t, d in pieces}
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": d, "domain": domain_of.get(d, "planted")}) + "\n" for d in docs)
    )
    prepared = prepare_corpus(PrepareConfig(input=corpus, output_prefix=work / "data" / "train"))
    (work / "queries.jsonl").write_text("".join(json.dumps(x.query()) + "\n" for x in [*planted, *leak_plan]))
    out = {
        "settings": settings, "prefix": str(prepared.prefix), "shards": str(prepared.shards_dir),
        "docs": len(docs),
        "gold": {
            "facts": [list(f.supporting) for f in planted],
            "distractors": [list(f.distractors) for f in planted],
            "same_relation": [list(f.same_relation) for f in planted],
            "leaks": [list(x.copies) for x in leak_plan],
        },
    }  # fmt: skip
    done_path.write_text(json.dumps(out))
    return out


def train(work: Path, prefix: str, *, steps: int, seed: int) -> Path:
    from mates_megatron.launch import run_config
    from mates_megatron.pretrain import launch_checked

    ckpt = work / "ckpt"
    run = {
        "data_prefix": prefix, "model": MODEL,
        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "cpu": not torch.cuda.is_available()},
        "micro_batch_size": 8, "global_batch_size": 16, "train_iters": steps, "lr": 0.002, "min_lr": 0.0002,
        "lr_warmup_iters": 20, "lr_decay_style": "cosine", "weight_decay": 0.1, "clip_grad": 1.0,
        "seed": seed, "log_interval": 50, "save": str(ckpt), "load": str(ckpt), "save_interval": steps,
    }  # fmt: skip
    run_config(run, work, runner=launch_checked)
    return work / "config.yaml"


def trace(work: Path, config: Path, shards: str, method: str, options: dict, top_k: int) -> dict:
    """One method's trace of ``work/queries.jsonl`` (kept, and reused when done): the ranking, scores and
    verdicts per query id, the ids in file order, and the trace's meta record."""
    from mates_megatron.trace.run import trace_command

    out = work / f"trace_{method}.jsonl"
    meta = out.with_name(out.name + ".meta.json")
    if not meta.is_file():
        argv = ["--method", method, "--shards", shards, "--queries", str(work / "queries.jsonl"),
                "--out", str(out), "--config", str(config), "--load", str(work / "ckpt"),
                "--options", json.dumps(options), "--top-k", str(top_k)]  # fmt: skip
        if trace_command(argv):
            raise RuntimeError(f"trace --method {method} failed")
    run: dict[str, Any] = {"ranked": {}, "scores": {}, "verdicts": {}, "order": []}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        run["order"].append(r["id"])
        run["ranked"][r["id"]] = r["ids"]
        run["scores"][r["id"]] = r["scores"]
        run["verdicts"][r["id"]] = r.get("supportive")
    run["meta"] = json.loads(meta.read_text())
    return run


def bench_trace(
    data: Path, work: Path, *, background: int = 800, facts: int = 16, leaks: int = 5, steps: int = 300,
    seeds: tuple[int, ...] = (0, 1, 2), supports: int = 3, distractors: int = 2, same_relation: int = 2,
    paraphrase: bool = True, top_k: int = 30, options: dict[str, dict] | None = None,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:  # fmt: skip
    """Every seed plants its own pool (``work/seed-N``), trains its own model and traces it with every
    method; figures per seed and their mean with a 95% interval over seeds."""
    from mates_lab.bench.trace_scores import summarize_seeds

    t0 = time.perf_counter()
    plan = {
        "supports": supports,
        "distractors": distractors,
        "same_relation": same_relation,
        "paraphrase": paraphrase,
    }
    per_seed = []
    for seed in seeds:
        sw = work / f"seed-{seed}"
        pool = build_pool(data, sw, background=background, facts=facts, leaks=leaks, seed=seed, plan=plan)
        config = train(sw, pool["prefix"], steps=steps, seed=seed)
        for method in methods:
            trace(sw, config, pool["shards"], method, (options or {}).get(method, {}), top_k)
        per_seed.append(score_seed(sw, top_k, methods))
        print(json.dumps({"seed": seed, **per_seed[-1]}), flush=True)
    return {
        "pool_documents": pool["docs"], "facts": facts, **plan, "leaks": leaks, "train_steps": steps,
        "seeds": list(seeds), "methods": list(methods), "ranking_depth": top_k, "summary": summarize_seeds(per_seed), "per_seed": per_seed,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def score_seed(seed_dir: Path, top_k: int, methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Every method's figures from a seed's finished traces (``seed_dir``: a ``--work/seed-N``)."""
    from mates_lab.bench.trace_scores import score_method

    pool = json.loads((seed_dir / "planted.json").read_text())
    st = pool["settings"]
    figures = {}
    for method in methods:
        run = trace(seed_dir, seed_dir / "config.yaml", pool["shards"], method, {}, top_k)
        figures[method] = score_method(method, run, pool["gold"], st["facts"], st["leaks"], top_k, st["seed"])
    return figures
