"""The base of the OT scorers ('lava', 'gotd', 'lookalike'): scores on frozen-encoder embeddings of the
reference and the round's candidates.

The encoder (``mates_megatron.encoder.Encoder``) is described by the scorer's own options: each OT scorer's
``Config`` is an ``EncoderConfig`` (model_path, max_length, max_chunks, device, bf16, features, batch_size; the
influence model's defaults) with its own fields added. Candidates are cached by id for the life of the
scorer (a pool reused across rounds is embedded once); nothing is checkpointed.

Known limitation: every rank embeds every candidate of the round (as the 'classifier' scorer scores them);
at 25.6M candidates a round the embedding should be sharded over ranks and gathered, or precomputed by
``mates-megatron value`` and read with the 'values' scorer.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from mates_megatron.encoder import Encoder, EncoderConfig
from mates_megatron.probe.reference import ReferenceFile
from mates_megatron.scorers.base import RoundInput, Scorer, ScorerContext


class EmbeddingScorer(Scorer):
    """A scorer on frozen-encoder embeddings of the reference and the round's candidates ('lava', 'gotd',
    'lookalike'): its ``Config`` is an ``EncoderConfig`` (the encoder it embeds with) with its own options.

    ``reference``: score toward this file instead of the host's reference set, for valuation where there is
    no host (``mates-megatron value``; its rounds then carry ``host=None``)."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference", "text"})
    gives_features: ClassVar[bool] = True

    def __init__(
        self,
        config: EncoderConfig | None = None,
        *,
        context: ScorerContext | None = None,
        reference: ReferenceFile | None = None,
        **_: Any,
    ) -> None:
        super().__init__(config or self.Config(), context=context)
        self.encoder = Encoder(self.config, device=self.device)
        self.reference_file = reference

    def reference(self, r: RoundInput) -> Any:
        """What the round scores toward: the file this scorer was given, else the host's reference set."""
        return self.reference_file if self.reference_file is not None else r.host.reference

    def embed(self, r: RoundInput, *, scorer: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(candidates, reference) embeddings of the round, and the seconds they took."""
        t = time.perf_counter()
        y = self.encoder.embed_reference(self.reference(r), scorer=scorer)
        x = self.encoder.embed_candidates(r.pool, r.candidates)
        return x, y, time.perf_counter() - t
