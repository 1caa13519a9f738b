"""A checkpoint file's identity without torch: its SHA-256 is the model's version, which riha_node's registry and
`models` commands read without loading a model."""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file: the model's identity (ReportModel.sha256, the SR's model version)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
