"""Tracing model behaviour back to training data: `mates-megatron trace` (run.py) over the ``TRACERS``
(base.py): Forward-INF, FASTTRACK (with its offline index, index.py), gradient-dot and BM25; planted facts
and leakage with known answers (planted.py) and the metrics they are judged by (metrics.py)."""
