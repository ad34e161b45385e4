"""Megatron-Core training pieces shared by the example loop, the demo and the tests."""
