"""What a checkpoint file is, without torch: its format name (the safetensors header's "format") and its SHA-256,
the model's version; riha_node's registry, `models` commands and readiness probe read them without loading a model."""
from __future__ import annotations

import hashlib
import os

CHECKPOINT_FORMAT = "riha-checkpoint"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file: the model's identity (ReportModel.sha256, the SR's model version)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
