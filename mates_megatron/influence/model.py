"""Where ``InfluenceConfig`` has been imported from; it lives in ``mates_megatron.influence.config``.

The influence model itself: ``base.InfluenceModel`` (the interface), ``finetune`` and ``ridge`` (the two
implementations), ``registry.INFLUENCE_MODELS``; the network they share is ``encoder.EncoderRegressor``.
"""

from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig, RidgeConfig

__all__ = ["FinetuneConfig", "InfluenceConfig", "RidgeConfig"]
