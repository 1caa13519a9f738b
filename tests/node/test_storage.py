"""UIDs never become hostile paths; files are written whole or not at all; damaged data sets are refused."""
from __future__ import annotations

import os
import stat

import pytest

from riha_node import storage
from riha_node.dataset_check import DamagedDataSet, read_received
from riha_node.storage import InstanceStore, valid_uid
from tests.node.samples import SHARED_SC_JPEG, dataset_bytes, real_file


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.1", "1", "0.0", "2.25." + "9" * 59])
def test_valid_uids(uid):
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../../x", "1..2", ".1", "1.", "1.2.a", "1/2", "1.2 ", "2.25." + "9" * 60,
                                 None, 12, "1.2\x00", "１.２"])
def test_invalid_uids(uid):
    assert not valid_uid(uid)


def test_relative_path_refuses_invalid_uids(tmp_path):
    store = InstanceStore(tmp_path)
    assert store.relative_path("1.2", "1.3", "1.4") == "studies/1.2/1.3/1.4.dcm"
    with pytest.raises(ValueError):
        store.relative_path("1.2", "../..", "1.4")


def test_write_durably_writes_whole_file_owner_only_and_leaves_no_temp(tmp_path):
    store = InstanceStore(tmp_path)
    store.prepare()
    rel = store.relative_path("1.2", "1.3", "1.4")
    store.write_durably(rel, [b"abc", b"def"])
    target = store.path(rel)
    assert target.read_bytes() == b"abcdef"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert list(tmp_path.rglob("*.partial")) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    store.prepare()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("riha_node.storage.os.fsync", disk_full)
    rel = store.relative_path("1.2", "1.3", "1.5")
    with pytest.raises(OSError):
        store.write_durably(rel, [b"partial data"])
    assert not store.path(rel).exists()
    assert list(tmp_path.rglob("*.partial")) == []


def test_emptied_folders_go_and_a_store_racing_the_removal_makes_its_folder_again(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    store.prepare()
    store.write_durably("studies/1.2/1.3/1.4.dcm", [b"kept"])
    store.write_durably("studies/1.2/1.5/1.6.dcm", [b"gone"])
    store.remove("studies/1.2/1.5/1.6.dcm")
    store.remove_empty_folders("studies/1.2")
    assert sorted(str(p.relative_to(tmp_path)) for p in store.studies.rglob("*")) == [
        "studies/1.2", "studies/1.2/1.3", "studies/1.2/1.3/1.4.dcm"]

    makedirs = storage._makedirs_durably
    calls = []

    def prunes_once(folder, root):  # the purge of the same study, between mkdir and open
        calls.append(folder)
        created = makedirs(folder, root)
        if len(calls) == 1:
            store.remove_empty_folders("studies/1.7")
        return created

    monkeypatch.setattr(storage, "_makedirs_durably", prunes_once)
    store.write_durably("studies/1.7/1.8/1.9.dcm", [b"late instance"])
    assert store.path("studies/1.7/1.8/1.9.dcm").read_bytes() == b"late instance" and len(calls) == 2


def test_prepare_removes_leftover_temp_files_only(tmp_path):
    store = InstanceStore(tmp_path)
    store.prepare()
    folder = tmp_path / "studies" / "1.2" / "1.3"
    folder.mkdir(parents=True)
    (folder / "1.4.dcm.123.456.partial").write_bytes(b"half")
    (folder / "1.5.dcm").write_bytes(b"whole")
    store.prepare()
    assert [p.name for p in folder.iterdir()] == ["1.5.dcm"]


def test_node_secret_is_stable_and_private(tmp_path):
    store = InstanceStore(tmp_path)
    store.prepare()
    first = store.node_secret()
    assert len(first) == 32 and store.node_secret() == first
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def test_watermark(tmp_path):
    store = InstanceStore(tmp_path)
    assert store.over_watermark(0.0001)
    assert not store.over_watermark(100.0)


@pytest.mark.parametrize("path,syntax", [(real_file("RG1_UNCR.dcm"), "1.2.840.10008.1.2.1"),
                                         (real_file("RG1_J2KR.dcm"), "1.2.840.10008.1.2.4.90"),
                                         (SHARED_SC_JPEG, "1.2.840.10008.1.2.4.50")])
def test_complete_real_data_sets_are_read(path, syntax):
    data = dataset_bytes(path)
    assert read_received(data, syntax).SOPInstanceUID
    for cut in (len(data) // 2, len(data) - 1, 101):
        with pytest.raises(DamagedDataSet):
            read_received(data[:cut], syntax)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 10, b"garbage" * 1000, os.urandom(4096)])
def test_garbage_is_refused(garbage):
    with pytest.raises(DamagedDataSet):
        read_received(garbage, "1.2.840.10008.1.2.1")
