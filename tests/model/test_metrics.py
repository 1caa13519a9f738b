"""NLG metrics as R2Gen computes them, and clinical efficacy from the labeler."""

import math

import pytest

from riha_model import metrics
from riha_model.errors import RihaModelError
from riha_model.metrics import clinical_efficacy, nlg_metrics

REPORTS = ["the heart is normal in size . the lungs are clear .",
           "there is a small left pleural effusion . no pneumothorax .",
           "the heart is enlarged . no focal consolidation ."]


def test_identical_reports_score_perfectly():
    scores = nlg_metrics(REPORTS, REPORTS)
    assert set(scores) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert scores["CIDEr"] > 5  # 10 x cosine similarity 1 with the idf of three distinct reports


def test_hand_computed_bleu_and_rouge(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # keep this one free of the Java start
    with pytest.warns(UserWarning, match="METEOR needs Java"):
        scores = nlg_metrics(["the heart is normal"], ["the heart is large"])
        short = nlg_metrics(["the heart is normal in size"], ["the heart is normal"])
    # clipped n-gram precisions 3/4, 2/3, 1/2, 0/1; equal lengths so no brevity penalty
    assert scores["BLEU_1"] == pytest.approx(0.75, abs=1e-6)
    assert scores["BLEU_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert scores["BLEU_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert scores["BLEU_4"] < 1e-3
    assert scores["ROUGE_L"] == pytest.approx(0.75, abs=1e-6)  # LCS 3 of 4 both ways
    assert scores["METEOR"] is None
    assert nlg_metrics(["the heart is normal"], ["the heart is large"], meteor=False)["METEOR"] is None
    # a short hypothesis pays the brevity penalty exp(1 - 6/4)
    assert short["BLEU_1"] == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_mismatched_or_empty_inputs_are_named():
    with pytest.raises(RihaModelError, match="2 reference reports but 1"):
        nlg_metrics(["a .", "b ."], ["a ."])
    with pytest.raises(RihaModelError, match="No reports"):
        clinical_efficacy([], [])


def test_clinical_efficacy_on_a_hand_labelled_set():
    references = ["The heart is enlarged. Small left pleural effusion.",        # Cardiomegaly, Effusion
                  "No pneumothorax. Heart size is normal. Lungs are clear.",    # No Finding
                  "Right pneumothorax. Possible consolidation."]                # Pneumothorax (consolidation -1)
    hypotheses = ["The heart is enlarged. No pleural effusion.",                # Cardiomegaly only
                  "Normal heart size. Small right pleural effusion.",           # Effusion (false)
                  "Right pneumothorax. Right lower lobe consolidation."]        # Pneumothorax, Consolidation (false)
    ce = clinical_efficacy(references, hypotheses)
    # 4 positives on each side, 2 shared: Cardiomegaly and Pneumothorax match; Effusion in row 2 and Consolidation
    # in row 3 are false; Effusion in row 1 and No Finding in row 2 are missed; uncertain consolidation is negative
    assert ce["micro_precision"] == pytest.approx(2 / 4)
    assert ce["micro_recall"] == pytest.approx(2 / 4)
    assert ce["micro_f1"] == pytest.approx(0.5)
    per = ce["per_observation_f1"]
    assert list(per) == list(metrics.OBSERVATIONS)
    assert per["Cardiomegaly"] == 1.0 and per["Pneumothorax"] == 1.0
    assert per["Pleural Effusion"] == 0.0 and per["No Finding"] == 0.0 and per["Consolidation"] == 0.0
    assert ce["macro_f1"] == pytest.approx(2 / 14)
    assert ce["macro_precision"] == pytest.approx(2 / 14) and ce["macro_recall"] == pytest.approx(2 / 14)
