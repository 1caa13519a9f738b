"""Everything the node creates (storage tree, database, SRs, temp files, key) is for its own user only.

Both tests run under the permissive umask most servers have (022), so the node must not rely on its caller's.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from riha_model.phantoms import write_phantoms
from riha_node.storage import TEMP_SUFFIX, InstanceStore
from tests.node.peers import StorescpProcess
from tests.node.test_loop import loop_node, send

PERMISSIVE_UMASK = 0o022


@contextmanager
def permissive_umask():
    previous = os.umask(PERMISSIVE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def readable_by_others(root: Path) -> list[str]:
    """Paths under (and including) root whose mode grants anything to group or others."""
    paths = [root, *root.rglob("*")]
    return sorted(f"{path.relative_to(root.parent)} {stat.filemode(path.lstat().st_mode)}"
                  for path in paths if path.lstat().st_mode & 0o077)


@pytest.mark.peer
@pytest.mark.slow
def test_a_node_that_ran_the_loop_left_nothing_readable_by_others(tmp_path, phantom_checkpoint):
    annotation = write_phantoms(tmp_path / "phantoms", 3, seed=9, dicom=True, image_size=64)
    study = sorted(sorted((annotation.parent / "dicom").iterdir())[0].glob("*.dcm"))
    pacs = StorescpProcess(tmp_path / "pacs", aet="PACS").start()
    node = loop_node(tmp_path / "node", phantom_checkpoint, ("PACS", pacs.port))
    with permissive_umask():  # the node and the worker it starts inherit it
        node.start()
    try:
        send(node, *study)
        node.wait_for(lambda: node.studies("exported"), timeout=120, what="the draft to be delivered")
    finally:
        pacs.stop()
        assert node.stop() == 0
    storage = node.storage_dir
    created = {path.relative_to(storage).parts[0] for path in storage.iterdir()}
    assert {"studies", "reports", "node.key", "riha-node.db"} <= created, created
    assert list((storage / "reports").rglob("*.dcm")), "no SR was written"
    assert readable_by_others(storage) == []


def test_temp_files_and_folders_are_owner_only_while_they_are_written(tmp_path):
    store = InstanceStore(tmp_path / "storage")
    store.root.mkdir()
    seen: list[str] = []

    class WatchedChunks(list):
        """The chunks of one instance; iterating them is when the temp file exists: look at it then."""

        def __iter__(self):
            (temp,) = (tmp_path / "storage").rglob(f"*{TEMP_SUFFIX}")
            seen.append(stat.filemode(temp.stat().st_mode))
            return super().__iter__()

    with permissive_umask():
        store.write_durably("studies/1.2.3/1.2.3.4/1.2.3.4.5.dcm", WatchedChunks([b"DICM", b"data"]))
    assert seen == ["-rw-------"], "the temp file was readable by others while it was written"
    assert readable_by_others(tmp_path / "storage" / "studies") == []
