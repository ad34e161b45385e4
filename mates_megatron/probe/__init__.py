"""Data influence on the live, sharded model. Importing the package registers every built-in estimator."""

from mates_megatron.probe import (
    forward,  # noqa: F401  (registers 'forward' beside estimators.py's three)
    rollout,  # noqa: F401  (registers 'rollout', Group-MATES's oracle)
)
