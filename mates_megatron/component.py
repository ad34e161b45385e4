"""The one base of registered components (scorers, selectors): options, declared needs, state, summary.

A component is a class registered by name in its kind's ``registry.Registry`` (``SCORERS``, ``SELECTORS``,
...), which refuses a class that does not derive from the kind's base. What the run asks of a component it
reads from class attributes declared here, never by probing for methods (``hasattr``): a capability a
component does not declare is one it does not have.

- ``Config``: the dataclass of its options, built through ``configio.build`` (one coercion and validation
  path, the same as YAML and flags); None: it takes none.
- ``needs``: what the run must provide (the kind's base lists the names it knows).
- ``stateful``: whether ``state_dict()`` is checkpointed and must be restored on resume (a stateless
  component's checkpoint entry stays None, so checkpoints written before this base load unchanged).
- ``state_dict``/``load_state_dict``/``summary``: {} / nothing / {} by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class Component:
    """Base of every registered component; see the module docstring."""

    Config: ClassVar[type | None] = None
    """Dataclass of the component's options; None: it takes none."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the run must provide for this component."""
    stateful: ClassVar[bool] = False
    """Whether ``state_dict()`` is saved with the checkpoint and restored on resume."""

    @classmethod
    def build_options(cls, options: Mapping[str, Any], *, name: str, where: str) -> Any:
        """``options`` as the component's ``Config``; ValueError naming ``where`` for options it does not
        take. ``name``: the registered name, for the message."""
        if cls.Config is None:
            if options:
                raise ValueError(f"{where}: {name!r} takes no options, got {sorted(options)}")
            return None
        from mates_megatron.configio import build

        return build(cls.Config, options, where=where)

    def state_dict(self) -> dict[str, Any]:
        """What the component carries across rounds (saved with the checkpoint when ``stateful``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state (stateless components have nothing to restore)."""
        return None

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for the run's summary ({}: nothing to add)."""
        return {}
