"""A thousand malformed and hostile data sets (tests/node/fuzz_corpus.py) through the SCP and through preprocessing.

Every case must get one of the node's own C-STORE statuses (never pynetdicom's "handler failed", never silence),
the node must keep serving, nothing may land outside the storage folder, and nothing acknowledged may be damaged.
Preprocessing must turn every case into model input or a `no usable image` reason, never an escaping exception.
"""
from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from riha_node.dataset_check import read_received
from riha_node.models import Instance
from riha_node.preprocess import NoUsableImage, prepare_study
from riha_node.statuses import StoreStatus
from riha_node.storage import InstanceStore, valid_uid
from tests.node.fuzz_corpus import KINDS, FuzzCase, build_corpus
from tests.node.peers import NodeProcess
from tests.node.samples import dataset_bytes, real_file

NODE_STATUSES = {int(status) for status in StoreStatus} - {StoreStatus.PROCESSING_FAILURE}
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 7.1.1.13: odd IDs 1..255)
STORAGE_LAYOUT = re.compile(r"^studies/([0-9.]+)/([0-9.]+)/([0-9.]+)\.dcm$")
NODE_FILE = re.compile(r"^(riha-node\.db.*|node\.key)$")  # the database, its journals and locks, the node's key


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[FuzzCase]:
    cases = build_corpus(tmp_path_factory.mktemp("fuzz-seeds"))
    assert len(cases) >= 1000, f"the corpus shrank to {len(cases)} cases"
    assert len({case.kind for case in cases}) == len(KINDS), "a hostile shape is missing from the corpus"
    return cases


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _send_all(cases: list[FuzzCase], folder: Path, port: int) -> dict[int, int | None]:
    """C-STORE every case as its bytes are (chunked from a file, no re-encoding), many per association."""
    folder.mkdir()
    paths = []
    for index, case in enumerate(cases):
        path = folder / f"{index:05}.dcm"
        path.write_bytes(case.part10())
        paths.append(path)
    answers: dict[int, int | None] = {}
    pending = list(range(len(cases)))
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        while pending:
            batch, contexts = [], set()
            for index in pending:
                pair = (cases[index].sop_class_uid, cases[index].transfer_syntax)
                if pair not in contexts and len(contexts) == MAX_CONTEXTS:
                    break
                contexts.add(pair)
                batch.append(index)
            ae = AE(ae_title="TESTSCU")
            ae.acse_timeout = ae.network_timeout = 10
            ae.dimse_timeout = 30
            for sop_class, syntax in sorted(contexts):
                ae.add_requested_context(sop_class, syntax)
            assoc = ae.associate("127.0.0.1", port, ae_title="RIHA")
            assert assoc.is_established, "the node refused an association during the fuzz run"
            done = 0
            for index in batch:
                answer = assoc.send_c_store(paths[index])
                answers[index] = getattr(answer, "Status", None)
                done += 1
                if not assoc.is_established:  # aborted by the node: the rest go on a new association
                    break
            if assoc.is_established:
                assoc.release()
            pending = pending[done:] if done < len(batch) else pending[len(batch):]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return answers


@pytest.mark.peer
@pytest.mark.slow
def test_every_hostile_data_set_gets_a_status_and_the_node_survives(tmp_path, corpus):
    node = NodeProcess(tmp_path / "node", quiet_period_s=60.0, extra_toml="[worker]\nprocesses = 0\n")
    escape_marker = Path("/tmp/riha-escape")  # one of the hostile UIDs aims here
    assert not escape_marker.exists()
    node.start()
    around_before, siblings_before = _tree(tmp_path), {p.name for p in tmp_path.parent.iterdir()}
    try:
        started = time.monotonic()
        answers = _send_all(corpus, tmp_path / "cases", node.port)
        elapsed = time.monotonic() - started
        assert node.process.poll() is None, f"the node died during the fuzz run:\n{node.log_text()[-3000:]}"

        unanswered = [f"{corpus[i].label}: {status}" for i, status in answers.items() if status not in NODE_STATUSES]
        assert not unanswered, f"{len(unanswered)} cases without one of the node's statuses: {unanswered[:10]}"
        assert len(answers) == len(corpus)
        tally = collections.Counter(answers.values())
        assert tally[0x0000] and tally[0xC000] and tally[0xC001] and tally[0xA900], tally

        # Still serving: C-ECHO and a good store on a fresh association, whose bogus transfer syntaxes (a made-up
        # UID, MPEG-4 video) are refused at negotiation while the good contexts are accepted.
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.3.4.5.6.7", "1.2.840.10008.1.2.4.102"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA")
        assert assoc.is_established
        assert [context.result for context in assoc.rejected_contexts] == [0x04]  # transfer syntax not supported
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(pydicom.dcmread(real_file("RG1_UNCR.dcm"))).Status == 0x0000
        assoc.release()
        instances = node.status()["instances"]
    finally:
        assert node.stop() == 0
    log = node.log_text()
    assert "Traceback" not in log and "Exception in" not in log, log[-3000:]

    # Nothing outside the storage folder: the only new paths around it are the sent cases and the node's log.
    new_around = {p for p in _tree(tmp_path) - around_before
                  if not p.startswith(("cases/", "node/storage/")) and p not in ("cases", "node/storage")}
    assert new_around <= {"node/serve.log", "node/cli.log"}, sorted(new_around)[:20]
    assert {p.name for p in tmp_path.parent.iterdir()} == siblings_before
    assert not escape_marker.exists(), "a hostile UID wrote outside the storage folder"
    # Inside it, every instance file (any *.dcm, anything under studies/) sits where valid UIDs put it.
    stored = []
    for path in node.storage_dir.rglob("*"):
        relative = str(path.relative_to(node.storage_dir))
        assert not path.is_symlink(), relative
        if path.is_dir():
            continue
        if relative.startswith("studies/") or path.suffix == ".dcm":
            match = STORAGE_LAYOUT.match(relative)
            assert match and all(valid_uid(uid) for uid in match.groups()), f"unexpected file {relative!r}"
            stored.append(path)
        elif "/" not in relative:
            assert NODE_FILE.match(relative), f"unexpected file {relative!r}"
    # Every acknowledged instance has its row and file, and what is on disk is one complete data set.
    assert len(stored) == instances
    for path in stored:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        read_received(dataset_bytes(path), syntax)
    print(f"\n{len(corpus)} cases in {elapsed:.1f} s; statuses {dict(tally)}; {instances} instances stored")


@pytest.mark.slow
def test_preprocessing_turns_every_hostile_file_into_input_or_a_reason(tmp_path, corpus):
    store = InstanceStore(tmp_path / "storage")
    outcomes: collections.Counter[str] = collections.Counter()
    escaped = []
    slowest = 0.0
    for index, case in enumerate(corpus):
        rel_path = f"studies/1.2.3/1.2.3.4/{index}.dcm"
        store.path(rel_path).parent.mkdir(parents=True, exist_ok=True)
        store.path(rel_path).write_bytes(case.part10())
        instance = Instance(sop_instance_uid=f"1.2.3.4.{index}", rel_path=rel_path, ignored_reason=None)
        started = time.monotonic()
        try:
            prepared = prepare_study(store, [instance])
            assert prepared.images and len(prepared.images) == len(prepared.view_ids)
            outcomes["model input"] += 1
        except NoUsableImage as exc:
            assert str(exc).startswith("no usable image: ") and len(str(exc)) > len("no usable image: ")
            outcomes["no usable image"] += 1
        except BaseException as exc:  # noqa: BLE001 - anything else escaping is the finding
            escaped.append(f"{case.label}: {type(exc).__name__}: {str(exc)[:120]}")
        slowest = max(slowest, time.monotonic() - started)
    assert not escaped, f"{len(escaped)} cases escaped preprocessing: {escaped[:5]}"
    assert outcomes["model input"] and outcomes["no usable image"], outcomes
    assert slowest < 10, f"one hostile file held preprocessing for {slowest:.1f} s"


def test_the_corpus_is_the_same_on_every_run(tmp_path, corpus):
    """A failure found by the corpus can be replayed: the same seeds and hypothesis settings give the same cases."""
    assert build_corpus(tmp_path) == corpus
