"""What the plugin runs on a Megatron-Core model, whichever host trains it: schedules, RNG, optimizers."""
