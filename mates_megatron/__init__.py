"""mates-megatron: model-aware data selection (MATES) for Megatron-Core pretraining."""

__version__ = "0.1.0"
