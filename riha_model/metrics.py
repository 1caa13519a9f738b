"""Report-generation metrics as the radiology report generation literature computes them.

Natural-language scores come from pycocoevalcap, called the way R2Gen's modules/metrics.py calls it: one reference
and one hypothesis per study, keyed by position, on reports that are already cleaned (so no PTB tokenizer), plus
CIDEr. Clinical efficacy labels both sides with the offline CheXpert labeler and scores the positive class.
"""

from __future__ import annotations

import shutil
import warnings

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from riha_model.errors import RihaModelError
from riha_model.labeler import OBSERVATIONS, POSITIVE, label_report


def _check_pairs(references: list[str], hypotheses: list[str]) -> None:
    if len(references) != len(hypotheses):
        raise RihaModelError(f"Got {len(references)} reference reports but {len(hypotheses)} generated ones; "
                             "pass one generated report per reference.")
    if not references:
        raise RihaModelError("No reports to score; pass at least one reference and generated report.")


def nlg_metrics(references: list[str], hypotheses: list[str], meteor: bool = True) -> dict[str, float | None]:
    """BLEU_1..BLEU_4, METEOR, ROUGE_L and CIDEr over the corpus.

    METEOR starts a Java process (seconds on a small machine): meteor=False skips it, e.g. for per-epoch model
    selection on BLEU-4; it is also None, with a warning, when Java is missing. Line breaks become spaces: METEOR's
    Java process reads one line per pair.
    """
    _check_pairs(references, hypotheses)
    gts = {i: [text.replace("\n", " ")] for i, text in enumerate(references)}
    res = {i: [text.replace("\n", " ")] for i, text in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"BLEU_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = None
    if meteor and shutil.which("java"):
        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ stops the Java process
    elif meteor:
        warnings.warn("METEOR needs Java on PATH (install a JRE); it is reported as None.", stacklevel=2)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Undefined ratios count as 0, as scikit-learn's zero_division=0 does."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def clinical_efficacy(references: list[str], hypotheses: list[str]) -> dict:
    """Precision, recall and F1 of the 14 CheXpert observations (uncertain and unmentioned count as negative).

    Returns micro_* (pooled counts), macro_* (mean over the 14 observations) and per_observation_f1.
    """
    _check_pairs(references, hypotheses)
    return efficacy_from_labels([label_report(text) for text in references],
                                [label_report(text) for text in hypotheses])


def efficacy_from_labels(reference_labels: list[dict], hypothesis_labels: list[dict]) -> dict:
    """clinical_efficacy from labels already computed (one {observation: label} dict per report)."""
    counts = {}
    for name in OBSERVATIONS:
        truth = [labels[name] == POSITIVE for labels in reference_labels]
        guess = [labels[name] == POSITIVE for labels in hypothesis_labels]
        counts[name] = (sum(t and g for t, g in zip(truth, guess)), sum(g and not t for t, g in zip(truth, guess)),
                        sum(t and not g for t, g in zip(truth, guess)))
    per_observation = {name: _precision_recall_f1(*counts[name]) for name in OBSERVATIONS}
    micro = _precision_recall_f1(*(sum(c[i] for c in counts.values()) for i in range(3)))
    macro = [sum(values[i] for values in per_observation.values()) / len(OBSERVATIONS) for i in range(3)]
    return {"micro_precision": micro[0], "micro_recall": micro[1], "micro_f1": micro[2],
            "macro_precision": macro[0], "macro_recall": macro[1], "macro_f1": macro[2],
            "per_observation_f1": {name: values[2] for name, values in per_observation.items()}}
