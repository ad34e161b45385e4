"""The Megatron-LM releases the integration supports: one patch per release line, named by its tag.

The patch calls into this package from Megatron-LM's ``training.py``, ``checkpointing.py`` and
``pretrain_gpt.py``; those files change between releases (core_v0.17/0.18 moved the dataset-rank hunk, and
core_v0.19 the argument parsing and the checkpoint save), so a run on a release no patch targets is refused
at start-up, with the patches there are, instead of failing mid-run in a hunk that no longer fits.
"""

from __future__ import annotations

PATCHES: dict[str, str] = {
    "0.16": "core_v0.16.1",
    "0.19": "core_v0.19.0",
}
"""megatron-core release line (major.minor) -> the Megatron-LM tag its patch in ``patches/`` targets."""


def patch_name(tag: str) -> str:
    return f"patches/megatron-lm-{tag}-mates.patch"


def check_megatron_core_version(version: str | None = None) -> str:
    """The Megatron-LM tag whose patch fits megatron-core ``version`` (default: the one importable).

    Raises:
        RuntimeError: no patch targets this release; the message names the supported ones and the fix.
    """
    if version is None:
        from megatron.core import __version__ as version
    line = ".".join(str(version).split(".")[:2])
    if line in PATCHES:
        return PATCHES[line]
    supported = ", ".join(f"{v}.x ({patch_name(t)})" for v, t in PATCHES.items())
    raise RuntimeError(
        f"megatron-core {version}: the MATES Megatron-LM integration has no patch for this release; it "
        f"supports {supported}. Check out one of those tags (git -C $MEGATRON_LM_DIR checkout "
        f"{' or '.join(PATCHES.values())}) and apply its patch, or port the patch to this release as "
        "patches/README.md describes."
    )
