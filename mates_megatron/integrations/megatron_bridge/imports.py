"""Bridge imported on use, naming the install that is missing. A leaf: the callback and the provider import it
rather than the package's ``__init__``, which imports them lazily (no import circle)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "pip install 'mates-megatron[bridge]'"


def import_bridge(module: str) -> ModuleType:
    """Import a Megatron-Bridge module, or say which install is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing.split(".")[0] == "megatron" or missing.startswith("megatron.bridge"):
            raise ImportError(
                f"the Megatron-Bridge integration needs megatron-bridge ({module} could not be imported: {e}); "
                f"install it with {EXTRA}"
            ) from e
        raise ImportError(
            f"megatron-bridge is installed but {module} could not be imported: {e}. Bridge's package imports "
            f"its dependencies at import time ({missing} here; transformer-engine needs a CUDA machine); "
            f"install them ({EXTRA} on a GPU machine)"
        ) from e
