"""The options of the built-in document pools (``pool: {kind: NAME, ...}``): plain dataclasses, importable
without the pools' readers (the flags of earlier releases are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WebDatasetPoolConfig:
    """Options of the 'webdataset' pool (``pool: {kind: webdataset, shards: DIR}``)."""

    shards: str | None = None
    """Directory of WebDataset tar shards with manifest.json (written by `mates-megatron prepare`)."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError(
                "WebDatasetPoolConfig.shards is required with pool 'webdataset' (the shard directory)"
            )


@dataclass(frozen=True)
class EnergonPoolConfig:
    """Options of the 'energon' pool (``pool: {kind: energon, shards: ROOT, split: train, ...}``;
    `pip install 'mates-megatron[energon]'`)."""

    shards: str | None = None
    """Root of the Energon-prepared dataset: the directory holding .nv-meta/."""
    split: str = "train"
    """Split whose samples are the candidates: a split part of its .nv-meta/split.yaml."""
    text_field: str = "text"
    """Field of each sample holding the document's text: an attribute of the sample type its dataset.yaml
    declares ('text' for TextSample), or for a CrudeWebdataset a part in Energon's field syntax ('txt',
    'json[text]')."""
    domain_field: str | None = None
    """Where a sample's domain comes from: a part in Energon's field syntax ('json[domain]', 'domain.txt'),
    '__shard__' (each shard is one domain), or None (unknown)."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError(
                "EnergonPoolConfig.shards is required with pool 'energon' (the Energon dataset's root, the "
                "directory holding .nv-meta/)"
            )
