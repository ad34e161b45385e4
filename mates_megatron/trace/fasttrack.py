"""FASTTRACK (Chen et al. 2024): route the query to a few leaves of the offline index, then verify each
candidate there as supportive evidence for the query's fact or not.

Routing (``index.py``): the leaves sharing the query's rarest words, then the nearest by encoder
embedding; the candidates are the routed leaves' documents that contain one of the query's keywords (a
document that never names what the query is about cannot state its fact; when none does, all of them).
Verification, by the model that was trained on the pool (no LLM judge on this machine), in one of two
ways, each judged against ``null_docs`` documents drawn at random from the pool (a null the model and the
query calibrate themselves, no labels):

- ``mirrored`` (default): Forward-INF's loss changes of the candidates under a small step on the query's
  whole statement (``z_all``: the document is about the fact's words) and under a step on its target alone
  (``z_target``: the document teaches the fact's object after its context, which a distractor naming the
  entity does not); supportive when both are ``z`` standard deviations above the null's mean. Score: the
  smaller of the two.
- ``likelihood``: the paper's reading test, ``gain(d) = loss(target | context) - loss(target | d, context)``,
  supportive when ``gain > mean + z * std`` of the null. It needs a model that can use its context (copy a
  fact it has just read); the 4-layer bench model cannot (measured: supportive documents' gains sit inside
  the null's), which is why ``mirrored`` is the default.

The verdicts are the set the F1 is measured on; the candidates are also ranked by their score (top-k).
Every candidate costs one forward pass (likelihood) or three (mirrored: before, and after each step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch.distributed as dist

from mates_megatron.probe.reference import make_batch
from mates_megatron.probe.snapshot import TrainingSnapshot
from mates_megatron.trace.base import TRACERS, TopK, TraceInput, Tracer, TraceResult
from mates_megatron.trace.bm25 import words
from mates_megatron.trace.index import IndexSettings, load_or_build, word_hash
from mates_megatron.trace.model_passes import candidate_batches, descend, losses


@dataclass
class FastTrackOptions:
    index_dir: str | None = None
    """Where the index lives (default: ``<shards>/trace`` beside the pool's shards)."""
    index: IndexSettings = field(default_factory=IndexSettings)
    route_leaves: int = 8
    """Leaves a query is routed to."""
    max_candidates: int = 512
    """Most candidates verified per query (leaves are taken nearest first until this is reached)."""
    verifier: str = "mirrored"
    """"mirrored" (Forward-INF loss changes) or "likelihood" (the model reads the document first)."""
    null_docs: int = 64
    z: float = 2.0
    drop: float = 0.05
    """The mirrored verifier's step (as Forward-INF's ``drop``)."""
    micro_batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.index, dict):
            self.index = IndexSettings(**self.index)
        if self.verifier not in ("mirrored", "likelihood"):
            raise ValueError(f"fasttrack verifier={self.verifier!r}: use 'mirrored' or 'likelihood'")
        if (
            self.route_leaves < 1
            or self.max_candidates < 1
            or self.null_docs < 2
            or self.micro_batch_size < 1
        ):
            raise ValueError(
                f"fasttrack options route_leaves={self.route_leaves}, max_candidates={self.max_candidates}, "
                f"null_docs={self.null_docs}, micro_batch_size={self.micro_batch_size}: need route_leaves >= 1, "
                "max_candidates >= 1, null_docs >= 2, micro_batch_size >= 1"
            )


def query_parts(tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """The query's real tokens (context then target) from its reference row."""
    counted = np.flatnonzero(loss_mask)
    return tokens[: counted[-1] + 2]


def with_document(doc: np.ndarray, query: np.ndarray, n_target: int, seq_length: int):
    """(tokens [seq + 1], loss_mask [seq]) of ``doc`` then ``query``, the target's labels counted; the
    document is cut from its end when the two do not fit (the query is kept whole)."""
    room = seq_length + 1 - len(query)
    if room < 0:
        raise ValueError(
            f"the query is {len(query)} tokens, longer than the model's window ({seq_length + 1})"
        )
    seq = np.concatenate([doc[:room], query]).astype(np.int64)
    row = np.zeros(seq_length + 1, dtype=np.int64)
    row[: len(seq)] = seq
    mask = np.zeros(seq_length, dtype=np.float32)
    mask[len(seq) - 1 - n_target : len(seq) - 1] = 1.0
    return row, mask


@TRACERS.register("fasttrack")
class FastTrackTracer(Tracer):
    Config: ClassVar[type] = FastTrackOptions
    method = "fasttrack"

    def __init__(self, options: FastTrackOptions | None = None) -> None:
        self.options = options or FastTrackOptions()

    def index_dir(self, pool) -> Path:
        if self.options.index_dir:
            return Path(self.options.index_dir)
        if not hasattr(pool, "dir"):
            raise ValueError("fasttrack: this pool has no shard directory; set the option index_dir")
        return Path(pool.dir) / "trace"

    def _gains(self, ctx, pool, docs: np.ndarray, query: np.ndarray, n_target: int) -> np.ndarray:
        """gain(d) for every d in ``docs`` (the query alone is evaluated in the same pass)."""
        mbs = self.options.micro_batch_size
        rows = [with_document(np.zeros(0, np.int64), query, n_target, ctx.seq_length)]
        rows += [with_document(pool.tokens(int(d)), query, n_target, ctx.seq_length) for d in docs]
        rows += [rows[-1]] * (-len(rows) % mbs)
        tokens, masks = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        batches = [make_batch(tokens[i : i + mbs], masks[i : i + mbs]) for i in range(0, len(rows), mbs)]
        loss = losses(ctx, batches, len(docs) + 1)
        return loss[0] - loss[1:]

    def _mirrored(self, ctx, pool, docs: np.ndarray, rows, qi: int, snap) -> np.ndarray:
        """[2, len(docs)]: loss drops of ``docs`` under a step on query ``qi``'s whole text and its target."""
        mbs = self.options.micro_batch_size
        before = losses(ctx, candidate_batches(pool, docs, mbs), len(docs))
        out = []
        for r in (rows.with_all_tokens(), rows):
            try:
                descend(ctx, make_batch(r.tokens[qi : qi + 1], r.loss_mask[qi : qi + 1]), self.options.drop)
                out.append(before - losses(ctx, candidate_batches(pool, docs, mbs), len(docs)))
            finally:
                snap.restore()
        return np.stack(out)

    def _verify(self, ctx, pool, docs, null, rows, qi, snap) -> tuple[np.ndarray, np.ndarray]:
        """(score, supportive) of ``docs`` for query ``qi`` against the ``null`` documents."""
        both = np.concatenate([null, docs])
        if self.options.verifier == "likelihood":
            query = query_parts(rows.tokens[qi], rows.loss_mask[qi])
            g = self._gains(ctx, pool, both, query, int(rows.loss_mask[qi].sum()))[None]
        else:
            g = self._mirrored(ctx, pool, both, rows, qi, snap)
        n = g[:, : len(null)]
        sd = n.std(axis=1, ddof=1, keepdims=True).clip(1e-12)
        z = (g[:, len(null) :] - n.mean(axis=1, keepdims=True)) / sd
        score = z.min(axis=0)
        return score, score > self.options.z

    def trace(self, inp: TraceInput) -> TraceResult:
        from mates_megatron.encoder import Encoder, EncoderConfig

        ctx, rows, opt = inp.model, inp.queries.rows, self.options
        if ctx is None or rows is None:
            raise ValueError("fasttrack needs the model (its verifier) and tokenised queries")
        emb = Encoder(EncoderConfig(max_length=opt.index.max_length, batch_size=32))
        directory = self.index_dir(inp.pool)
        t0 = time.perf_counter()
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        status = None
        if rank0:  # one writer; the others read what it wrote
            _, status = load_or_build(directory, inp.pool, opt.index, emb.embed_candidates)
        if dist.is_initialized():
            dist.barrier()
        index, _ = load_or_build(directory, inp.pool, opt.index, None)
        index_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        q_emb = emb.embed(inp.queries.texts)
        allowed = np.zeros(len(inp.pool), dtype=bool)
        allowed[inp.ids] = True
        null = np.sort(
            np.random.default_rng(inp.seed).choice(inp.ids, min(opt.null_docs, len(inp.ids)), replace=False)
        )
        g = ctx.groups
        per_query, verdicts, routed = [], [], []
        routed_ids, candidate_ids = [], []  # kept for the bench's routing recall and oracle verifier
        snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
        for qi in range(len(rows)):
            q_words = words(inp.queries.texts[qi])
            cand: list[int] = []
            for leaf in index.route(q_words, q_emb[qi], opt.route_leaves):
                cand += [int(c) for c in index.members(int(leaf)) if allowed[c]]
                if len(cand) >= opt.max_candidates:
                    break
            cand = np.array(sorted(set(cand[: opt.max_candidates])), dtype=np.int64)
            routed_ids.append(cand.tolist())
            keys = index.keywords(q_words)
            named = [c for c in cand if keys & {word_hash(w) for w in words(inp.pool.text(int(c)))}]
            cand = np.array(named, dtype=np.int64) if named else cand
            routed.append(len(cand))
            candidate_ids.append(cand.tolist())
            mine = cand[g.data_parallel_rank :: g.data_parallel_size]
            top = TopK(1, inp.top_k)
            if len(mine):
                score, ok = self._verify(ctx, inp.pool, mine, null, rows, qi, snap)
                top.add(mine, score[None])
                verdicts.append(mine[ok])
            else:
                verdicts.append(np.zeros(0, dtype=np.int64))
            per_query.append(top)
        if g.data_parallel_size > 1:
            parts: list = [None] * g.data_parallel_size
            dist.all_gather_object(parts, verdicts, group=g.data_parallel)
            verdicts = [np.concatenate([p[q] for p in parts]) for q in range(len(rows))]
        ids, scores = TopK.stack(per_query).merged(g.data_parallel).result()
        return TraceResult(
            ids, scores, self.method,
            verdicts=[np.sort(v).astype(np.int64) for v in verdicts],
            record={
                "seconds": time.perf_counter() - t0, "index_seconds": index_seconds, "index": status,
                "leaves": index.num_leaves, "routed_candidates": routed, "verifier": opt.verifier,
                "routed_ids": routed_ids, "candidate_ids": candidate_ids,
            },
        )  # fmt: skip
