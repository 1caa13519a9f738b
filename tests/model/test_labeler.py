"""The rule-based CheXpert labeler: negation and uncertainty scope, heart statements, No Finding, agreement with
the real reports' MeSH codes."""

import importlib.util
from pathlib import Path

import pytest

from riha_model.labeler import OBSERVATIONS, label_report

ROOT = Path(__file__).resolve().parents[2]


def labels(text: str) -> dict:
    """Only the observations the report speaks of."""
    return {name: value for name, value in label_report(text).items() if value is not None}


def test_observations_are_chexperts_fourteen_in_order():
    assert OBSERVATIONS == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
        "Support Devices")
    assert list(label_report("")) == list(OBSERVATIONS)


@pytest.mark.parametrize(("text", "expected"), [
    ("No pleural effusion.", {"Pleural Effusion": 0}),
    ("There is no evidence of pneumothorax.", {"Pneumothorax": 0}),
    ("Lungs are clear without focal consolidation.", {"Consolidation": 0}),
    ("Negative for pneumothorax. Free of pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 0}),
    ("No focal airspace disease, pleural effusion, or pneumothorax.",
     {"Lung Opacity": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Pleural effusion is not seen.", {"Pleural Effusion": 0}),
    ("The left pneumothorax has resolved.", {"Pneumothorax": 0}),
])
def test_negation(text, expected):
    assert labels(text) == {"No Finding": 1, **expected}


@pytest.mark.parametrize(("text", "observation"), [
    ("Possible consolidation.", "Consolidation"),
    ("Left basilar opacity may represent atelectasis.", "Atelectasis"),
    ("Pneumonia cannot be excluded.", "Pneumonia"),
    ("Cannot exclude a small effusion.", "Pleural Effusion"),
    ("Questionable small pneumothorax at the right apex.", "Pneumothorax"),
    ("Findings are suggestive of pulmonary edema.", "Edema"),
    ("Scarring versus atelectasis in the lingula.", "Atelectasis"),
    ("No new consolidation.", "Consolidation"),  # CheXpert: an old one may remain
    ("Blunting of the left costophrenic angle.", "Pleural Effusion"),
    ("Mild pulmonary vascular congestion.", "Edema"),
])
def test_uncertainty(text, observation):
    result = label_report(text)
    assert result[observation] == -1
    assert result["No Finding"] is None


def test_negation_scope_ends_at_but_and_new_clauses():
    assert labels("No pneumothorax but a small left effusion.") == {"Pneumothorax": 0, "Pleural Effusion": 1}
    assert labels("There is no evidence of pneumothorax and there is a small effusion.") == {
        "Pneumothorax": 0, "Pleural Effusion": 1}
    assert labels("No cardiomegaly with bilateral small pleural effusions.") == {
        "Cardiomegaly": 0, "Pleural Effusion": 1}
    assert labels("No significant change in the right pleural effusion.") == {"Pleural Effusion": 1}


@pytest.mark.parametrize(("text", "expected"), [
    ("Heart size is normal.", 0),
    ("The heart is normal in size.", 0),
    ("Normal heart size.", 0),
    ("The heart is not enlarged.", 0),
    ("Heart size is at the upper limits of normal.", 0),
    ("The heart is enlarged.", 1),
    ("The cardiac silhouette is mildly enlarged.", 1),
    ("Enlarged heart.", 1),
    ("Stable cardiomegaly.", 1),
    ("Borderline heart size.", -1),
    ("The heart may be enlarged.", -1),
    ("History of CHF, no edema.", None),
])
def test_heart_statements(text, expected):
    assert label_report(text)["Cardiomegaly"] == expected


def test_state_words_go_with_their_own_subject():
    result = label_report("Normal heart size with enlarged pulmonary arteries.")
    assert result["Cardiomegaly"] == 0
    result = label_report("The heart is normal in size and the mediastinum is widened.")
    assert (result["Cardiomegaly"], result["Enlarged Cardiomediastinum"]) == (0, 1)
    result = label_report("The heart and mediastinum are within normal limits. Stable heart size.")
    assert (result["Cardiomegaly"], result["Enlarged Cardiomediastinum"], result["No Finding"]) == (0, 0, 1)


def test_conflicting_mentions_follow_chexpert():
    # positive beats negative, uncertain beats negative
    assert label_report("No right effusion. Small left effusion.")["Pleural Effusion"] == 1
    assert label_report("No large effusion. Possible small effusion.")["Pleural Effusion"] == -1
    # heart failure hints at cardiomegaly
    assert label_report("Findings of congestive heart failure.")["Cardiomegaly"] == -1


def test_no_finding_ignores_support_devices_but_not_other_abnormalities():
    assert labels("Right IJ catheter tip in the SVC. No pneumothorax.") == {
        "No Finding": 1, "Pneumothorax": 0, "Support Devices": 1}
    assert label_report("Lungs are clear. Degenerative changes of the thoracic spine.")["No Finding"] is None
    assert label_report("Lungs are clear. No hiatal hernia.")["No Finding"] == 1
    assert label_report("Calcified granuloma in the right upper lobe.")["Lung Lesion"] is None
    assert label_report("A 2 cm nodule in the right upper lobe.")["Lung Lesion"] == 1


def test_look_alike_phrases_are_not_mentions():
    result = label_report("Large pericardial effusion. Kerley B lines. Old granulomatous infection.")
    assert result["Pleural Effusion"] is None and result["Support Devices"] is None and result["Pneumonia"] is None


def test_agreement_with_nlm_mesh_codes_on_real_reports():
    """The four observations the coders' codes cover best agree with F1 >= 0.85 (bench/labeler.py has the table)."""
    spec = importlib.util.spec_from_file_location("bench_labeler", ROOT / "bench" / "labeler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.agreement()
    assert len(bench.coded_reports(bench.DEFAULT_CSV)) > 2500
    for observation in bench.TARGETS:
        assert table[observation]["f1"] >= 0.85, (observation, table[observation])
        assert table[observation]["f1"] > table[observation]["baseline_f1"]
