"""The study life cycle, ingest rules, quiet-period assembly and the atomic job claim."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from pydicom import Dataset
from sqlalchemy import func, select

from riha_node.assembly import close_quiet_studies
from riha_node.config import StudyConfig
from riha_node.ingest import InvalidInstance, ReceivedInstance, ignored_reason, patient_key, record_instance
from riha_node.jobs import claim, enqueue
from riha_node.models import Job, Study, StudyTransition, utcnow
from riha_node.states import ALLOWED, InvalidTransition, JobState, StudyState, can_move, move

SECRET = b"k" * 32


def chest_dataset(study_uid="1.2.3", sop_uid="1.2.3.1.1", **extra) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, study_uid + ".1", sop_uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientID, ds.AccessionNumber = "PAT-001", "ACC-001"
    ds.PixelData = b"\x00\x00"
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def received(**kwargs) -> ReceivedInstance:
    return ReceivedInstance.from_dataset(chest_dataset(**kwargs), "1.2.840.10008.1.2.1")


def store(session, instance: ReceivedInstance, rules=StudyConfig()) -> Study:
    return record_instance(session, instance, reason=ignored_reason(instance, rules), rel_path="x", size_bytes=1,
                           dataset_sha256="0" * 64, calling_ae="PACS", secret=SECRET)


def test_every_state_is_reachable_and_terminal_states_can_reopen():
    reachable = {target for targets in ALLOWED.values() for target in targets}
    assert reachable == set(StudyState)
    assert can_move(StudyState.EXPORTED, StudyState.RECEIVING)
    assert not can_move(StudyState.RECEIVING, StudyState.EXPORTED)
    assert not can_move(StudyState.IGNORED, StudyState.QUEUED)


def test_move_validates_and_records_the_audit_trail(database):
    with database.session() as session:
        study = store(session, received())
        move(session, study, StudyState.QUEUED, "done")
        with pytest.raises(InvalidTransition):
            move(session, study, StudyState.EXPORTED)
        trail = session.execute(select(StudyTransition.from_state, StudyTransition.to_state)
                                .order_by(StudyTransition.id)).all()
    assert trail == [(None, "receiving"), ("receiving", "queued")]


def test_identity_rules():
    with pytest.raises(InvalidInstance, match="StudyInstanceUID is missing or not a valid UID"):
        received(study_uid="../../etc")
    assert received(RequestedProcedurePriority="STAT").priority == 0
    assert received(StudyPriorityID="LOW").priority == 3
    assert received().priority == 2
    assert patient_key("PAT-001", SECRET) == patient_key("PAT-001", SECRET) != patient_key("PAT-002", SECRET)
    assert "PAT-001" not in patient_key("PAT-001", SECRET)


@pytest.mark.parametrize("extra,reason", [
    ({}, None),
    ({"BodyPartExamined": ""}, None),
    ({"Modality": "CT"}, "modality CT is not one of CR, DX"),
    ({"BodyPartExamined": "ABDOMEN"}, "body part ABDOMEN is not a chest"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.22"},
     "SOP class 1.2.840.10008.5.1.4.1.1.88.22 is not an accepted radiograph class"),
])
def test_ignore_rules(extra, reason):
    assert ignored_reason(received(**extra), StudyConfig()) == reason


def test_no_pixel_data_is_ignored():
    ds = chest_dataset()
    del ds.PixelData
    assert ignored_reason(ReceivedInstance.from_dataset(ds, "1.2.840.10008.1.2"), StudyConfig()) == "no pixel data"


def test_patient_id_is_not_stored_in_clear(database):
    with database.session() as session:
        study = store(session, received())
        assert study.patient_key != "PAT-001" and len(study.patient_key) == 64
        assert study.accession_number == "ACC-001"


def test_ignored_study_reopens_when_a_chest_image_arrives(database):
    with database.session() as session:
        study = store(session, received(sop_uid="1.2.3.9", Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"))
        assert study.state == "ignored" and "not an accepted radiograph class" in study.state_reason
        study = store(session, received(sop_uid="1.2.3.10"))
        assert study.state == "receiving"


def test_quiet_period_queues_once_and_late_instance_reopens(database):
    with database.session() as session:
        store(session, received())
    assert close_quiet_studies(database, quiet_period_s=60) == []
    with database.session() as session:
        session.execute(Study.__table__.update().values(last_received_at=utcnow() - timedelta(seconds=61)))
    queued = close_quiet_studies(database, quiet_period_s=60)
    assert len(queued) == 1
    assert close_quiet_studies(database, quiet_period_s=60) == []
    with database.session() as session:
        study = store(session, received(sop_uid="1.2.3.1.2"))
        assert study.state == "receiving" and study.state_reason == "new instance after queued"
        jobs = session.scalars(select(Job.state)).all()
    assert jobs == [JobState.CANCELLED.value], "the superseded job is cancelled, not left for a worker"


def test_stat_first_then_arrival_order(database):
    with database.session() as session:
        for i, priority in enumerate(["ROUTINE", "LOW", "STAT", "ROUTINE"]):
            store(session, received(study_uid=f"1.2.{i}", sop_uid=f"1.2.{i}.1", RequestedProcedurePriority=priority))
        session.execute(Study.__table__.update().values(last_received_at=utcnow() - timedelta(seconds=5)))
    close_quiet_studies(database, quiet_period_s=1)
    order = []
    while (job := claim(database, "w", timedelta(seconds=30))) is not None:
        with database.session() as session:
            order.append(session.get(Study, job.study_id).study_uid)
    assert order == ["1.2.2", "1.2.0", "1.2.3", "1.2.1"]


def test_concurrent_claimers_never_share_a_job(database):
    with database.session() as session:
        for i in range(60):
            study = store(session, received(study_uid=f"1.5.{i}", sop_uid=f"1.5.{i}.1"))
            session.flush()
            enqueue(session, study)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(8)

    def worker(name):
        barrier.wait()
        mine = claimed.setdefault(name, [])
        while (job := claim(database, name, timedelta(seconds=30))) is not None:
            mine.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_claims = [job_id for ids in claimed.values() for job_id in ids]
    assert len(all_claims) == 60 and len(set(all_claims)) == 60
    with database.session() as session:
        owners = session.scalar(select(func.count(func.distinct(Job.lease_owner))))
        assert session.scalar(select(func.count()).where(Job.state == "running")) == 60
    assert owners >= 2, "the claims were not actually concurrent"


def test_expired_lease_is_claimed_again(database):
    with database.session() as session:
        study = store(session, received())
        session.flush()
        enqueue(session, study)
    first = claim(database, "crashed", timedelta(seconds=-1))
    assert first is not None
    second = claim(database, "healthy", timedelta(seconds=30))
    assert second is not None and second.id == first.id and second.attempts == 2
    assert claim(database, "third", timedelta(seconds=30)) is None


def test_an_operator_can_discard_a_queued_or_failed_study_but_not_one_in_processing(database):
    from riha_node.errors import UserError
    from riha_node.interventions import discard_study, retry_study

    with database.session() as session:
        study = store(session, received())
        session.execute(Study.__table__.update().values(last_received_at=utcnow() - timedelta(seconds=5)))
    close_quiet_studies(database, quiet_period_s=1)
    with database.session() as session:
        assert discard_study(session, "1.2.3").endswith("discarded")
        assert session.scalar(select(Study.state)) == "ignored"
        assert session.scalars(select(Job.state)).all() == [JobState.CANCELLED.value]
        with pytest.raises(UserError, match="is ignored; a study being processed"):
            discard_study(session, "1.2.3")
        with pytest.raises(UserError, match="only failed and export_failed studies can be retried"):
            retry_study(session, "1.2.3")
        study = store(session, received(sop_uid="1.2.3.1.2"))
        assert study.state == "receiving", "a new chest instance re-opens a discarded study"
        move(session, study, StudyState.QUEUED)
        move(session, study, StudyState.PROCESSING)
        with pytest.raises(UserError, match="is processing"):
            discard_study(session, "1.2.3")
        with pytest.raises(UserError, match="No study with StudyInstanceUID 9.9"):
            discard_study(session, "9.9")
