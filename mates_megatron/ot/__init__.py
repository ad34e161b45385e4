"""Optimal transport: one streamed log-domain Sinkhorn (``sinkhorn``) and the valuations built on it."""

from mates_megatron.ot.sinkhorn import (
    OTResult,
    SinkhornConfig,
    calibrated_gradient,
    sinkhorn,
    sinkhorn_divergence,
)

__all__ = ["OTResult", "SinkhornConfig", "calibrated_gradient", "sinkhorn", "sinkhorn_divergence"]
