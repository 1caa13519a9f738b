"""One checkpoint file: safetensors weights with a JSON header (config, vocabulary, metadata, metrics).

The header lives in safetensors' own metadata (a str -> str map), so the file is readable by any safetensors tool and
nothing in it is unpickled. Besides safetensors' structural checks, the header records a SHA-256 over the tensors, so
a flipped byte in the weights is caught too; `sha256` of the whole file identifies the model version.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from riha_model.config import RihaConfig
from riha_model.errors import RihaModelError
from riha_model.files import CHECKPOINT_FORMAT, file_sha256
from riha_model.model import RIHA

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and everything stored beside its weights."""

    model: RIHA
    config: RihaConfig
    tokenizer: dict  # riha_model.text.Tokenizer.to_dict()
    metadata: dict  # training information; "format_version" included
    metrics: dict
    sha256: str  # of the whole file
    path: Path


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: RIHA, config: RihaConfig, tokenizer_dict: dict,
                    metadata: dict | None = None, metrics: dict | None = None) -> str:
    """Write the checkpoint atomically (a reader never sees half a file); returns the file's SHA-256."""
    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
        "vocab_size": str(model.vocab_size),
        "tokenizer": json.dumps(tokenizer_dict),
        "metadata": json.dumps({**(metadata or {}), "format_version": FORMAT_VERSION}),
        "metrics": json.dumps(metrics or {}),
        "weights_sha256": weights_sha256(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return file_sha256(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint; any problem is a RihaModelError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise RihaModelError(f"Checkpoint {path} does not exist; check the path or train a model first.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            header = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RihaModelError(f"Checkpoint {path} is damaged or truncated ({exc}); copy it again or retrain.") from exc
    if header.get("format") != CHECKPOINT_FORMAT:
        raise RihaModelError(f"{path} is a safetensors file but not a RIHA checkpoint; pass a file written by "
                             "`riha-node train`.")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise RihaModelError(f"Checkpoint {path} has format version {header.get('format_version')}, this riha_model "
                             f"reads version {FORMAT_VERSION}; use the matching riha-node release.")
    try:
        config = RihaConfig.from_dict(json.loads(header["config"]))
        vocab_size = int(header["vocab_size"])
        tokenizer, metadata, metrics = (json.loads(header[key]) for key in ("tokenizer", "metadata", "metrics"))
    except (KeyError, ValueError, TypeError) as exc:
        raise RihaModelError(f"Checkpoint {path} has a damaged header ({exc!r}); copy it again or retrain.") from exc
    except RihaModelError as exc:
        raise RihaModelError(f"Checkpoint {path}: {exc}") from exc
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("tokens"), list) \
            and len(tokenizer["tokens"]) + 1 != vocab_size:
        raise RihaModelError(f"Checkpoint {path} stores a vocabulary of {len(tokenizer['tokens']) + 1} ids for an "
                             f"output layer of {vocab_size}; the file was assembled wrongly, retrain it.")
    with torch.device("meta"):  # no random initialisation, no second copy of the weights
        model = RIHA(config, vocab_size, pretrained=False)
    _check_tensors(path, model, tensors)
    if weights_sha256(tensors) != header.get("weights_sha256"):
        raise RihaModelError(f"Checkpoint {path} weights do not match the hash recorded when it was written; the "
                             "file is corrupt, copy it again.")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.to(map_location).eval()
    return Checkpoint(model=model, config=config, tokenizer=tokenizer, metadata=metadata, metrics=metrics,
                      sha256=file_sha256(path), path=path)


def _check_tensors(path: Path, model: RIHA, tensors: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    reshaped = sorted(f"{name} {tuple(tensors[name].shape)} vs {expected[name]}"
                      for name in expected.keys() & tensors.keys() if tuple(tensors[name].shape) != expected[name])
    if missing or unexpected or reshaped:
        def listing(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "") or "none"
        raise RihaModelError(f"Checkpoint {path} weights do not fit its configuration (missing: {listing(missing)}; "
                             f"unexpected: {listing(unexpected)}; other shape: {listing(reshaped)}); the file was "
                             "not written by this model layout.")
