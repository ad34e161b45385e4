"""Embedded data before a lab run trains on it: built when missing, checked against this machine when present."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mates_lab.data.embedded_config import EMBEDDED_FORMAT
from mates_lab.data.embedded_sources import EmbeddedCorpusError, _dependency_closure, _machine


def check_embedded_data(out_dir: str | Path) -> str | None:
    """Check embedded data already in ``out_dir`` before a run trains on it.

    Raises EmbeddedCorpusError, naming the rebuild command, when the manifest is missing or another
    builder format wrote it. Returns a warning when it was gathered from another Python or from other
    distributions or versions than the dependency closure of mates-megatron's core requirements has on this
    machine now (the data is consistent, but figures differ from a fresh build here), else None. Packages
    outside that closure (extras, anything else installed) do not matter: the builder does not read them.
    """
    out = Path(out_dir)
    rebuild = f"rebuild it with `mates-lab embedded --out {out}`"
    path = out / "embedded_manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EmbeddedCorpusError(f"{path} is missing or unreadable ({e}): {rebuild}") from None
    if manifest.get("format") != EMBEDDED_FORMAT:
        raise EmbeddedCorpusError(
            f"{out} was built by another mates-megatron (embedded format {manifest.get('format')}, this "
            f"version builds format {EMBEDDED_FORMAT}, a different corpus): {rebuild}. Runs checkpointed "
            "on the old data cannot resume on the new (their pool fingerprint differs)"
        )
    try:
        now = _machine(_dependency_closure())
    except EmbeddedCorpusError as e:
        return f"cannot compare {out} with this machine ({e}); to be sure, {rebuild}"
    then = {k: manifest.get("sources", {}).get(k) for k in now}
    if then["distributions"] is None:
        return f"{path} does not record the Python and packages it was gathered from; to be sure, {rebuild}"
    if then != now:
        added = sorted(set(now["distributions"]) - set(then["distributions"]))
        removed = sorted(set(then["distributions"]) - set(now["distributions"]))
        return (
            f"{out} was gathered from other files than this machine has (Python {then['python']}, now "
            f"{now['python']}; distributions added {added}, removed {removed}): runs are consistent with it, but "
            f"figures differ from a fresh build here; to match one, {rebuild}"
        )
    return None


def ensure_embedded_data(cfg: dict[str, Any]) -> int:
    """Before a run of ``cfg``: when it trains on data/embedded, build that data if it is missing, or check it
    (``check_embedded_data``) if present. Returns an exit code (2 with ``error: ...`` on stderr)."""
    prefix = Path(cfg.get("data_prefix", ""))
    if prefix.parent != Path("data/embedded"):
        return 0
    if not Path(f"{prefix}.bin").is_file():
        from mates_lab.data.commands import embed

        print(f"[mates-lab] preparing the embedded data into {prefix.parent} (first run only)", flush=True)
        return embed(prefix.parent)
    try:
        warning = check_embedded_data(prefix.parent)
    except EmbeddedCorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:
        print(f"[mates-lab] warning: {warning}", flush=True)
    return 0
