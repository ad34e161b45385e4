"""Where a benchmark's figures go: printed as JSON, and written to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path

from mates_megatron.files import atomic_write_text


def write_result(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
