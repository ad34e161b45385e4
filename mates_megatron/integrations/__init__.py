"""Entry points for training frameworks that run the plugin inside their own loop (Megatron-LM)."""
