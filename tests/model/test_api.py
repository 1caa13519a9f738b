"""ReportModel, the surface the node's worker uses: load once, draft reports for a batch of studies."""
from __future__ import annotations

import json

import numpy as np
import pytest

from riha_model.api import ReportModel, readable_report
from riha_model.files import file_sha256
from riha_model.errors import RihaModelError
from riha_model.images import FRONTAL, LATERAL, load_image


@pytest.fixture(scope="module")
def report_model(phantom_model) -> ReportModel:
    return ReportModel.load(phantom_model.result.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def test_studies(phantom_model) -> list[list[np.ndarray]]:
    annotation = json.loads(phantom_model.annotation.read_text())
    images = phantom_model.annotation.parent / "images"
    return [[load_image(images / path) for path in entry["image_path"]] for entry in annotation["test"][:3]]


def test_a_batch_of_studies_gives_the_reports_each_study_gets_alone(report_model, test_studies):
    """Studies of two views and of one view share one batched pass without changing each other's report."""
    studies = [test_studies[0], test_studies[1][:1], test_studies[2]]
    view_ids = [[FRONTAL, LATERAL], [FRONTAL], [FRONTAL, LATERAL]]
    batched = report_model.generate_reports(studies, view_ids)
    alone = [report_model.generate_reports([study], [views])[0] for study, views in zip(studies, view_ids)]
    assert batched == alone
    assert all(report and report[0].isupper() and report.endswith(".") for report in batched)
    assert report_model.generate_reports(studies) == batched  # default views: R2Gen's frontal, lateral order
    assert report_model.generate_reports([]) == []


def test_the_model_knows_its_version_hash_and_configuration(report_model, phantom_model):
    assert report_model.sha256 == file_sha256(phantom_model.result.checkpoint) == phantom_model.result.sha256
    assert report_model.version == f"riha-tiny-{report_model.sha256[:12]}"
    assert report_model.config.image_size == 64
    assert report_model.device.type == "cpu"


def test_bad_studies_are_refused_clearly(report_model, test_studies, tmp_path):
    with pytest.raises(RihaModelError, match="no image"):
        report_model.generate_reports([test_studies[0], []])
    with pytest.raises(RihaModelError, match="one view id per image"):
        report_model.generate_reports([test_studies[0]], [[FRONTAL]])
    with pytest.raises(RihaModelError, match=r"Checkpoint .*absent\.riha does not exist"):
        ReportModel.load(tmp_path / "absent.riha")


def test_readable_report_turns_tokens_into_sentences():
    assert readable_report("the heart is normal . no pleural effusion .") == \
        "The heart is normal. No pleural effusion."
    assert readable_report("") == ""
