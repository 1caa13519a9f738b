"""Draft versus signed report: how far radiologists move from what the model wrote, by model version and month.

For each study the pair compared is its ground truth (newest signed report, riha_node.ground_truth) and the newest
draft delivered to PACS before that signed report reached the node: the draft the radiologist could see. So a pair
forms only when a signed report arrives, and that is when it is scored, once, by `update_quality`: for the study
right after a signed SR is stored, for every study after `riha-node import-reports`, and again by `riha-node quality`
for anything missed. The texts are read in a read-only session, scored outside any transaction (the SQLite write
lock is never held while scoring) and written in one short transaction. A newer signed report makes a new pair; the
summary uses current pairs only.

BLEU-4 and ROUGE-L are pycocoevalcap's, called as riha_model.metrics calls them, on R2Gen-cleaned text (MIMIC-CXR
cleaning: signed reports span lines), one score per study; the summary averages them. Clinical efficacy labels both
texts with riha_model.labeler: agreement is the share of the 14 observations on which draft and signed report agree
about "positive" (uncertain and unmentioned are negative, as in riha_model.metrics), and micro F1 pools positive
counts over studies and observations with the signed report as truth.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from riha_model.labeler import OBSERVATIONS, POSITIVE, label_report
from riha_model.metrics import efficacy_from_labels
from riha_model.text import clean_report
from riha_node.db import Database
from riha_node.ground_truth import ground_truth_by_study, kept_aside_count
from riha_node.log import get_logger
from riha_node.models import Export, Report, ReportQuality, SignedReport, utcnow

log = get_logger(__name__)

TEXT_CHUNK = 500


@dataclass(frozen=True)
class Pair:
    """A study's current comparison: the draft the radiologist saw and the report they signed."""

    study_id: int
    report_id: int
    signed_report_id: int
    model_version: str
    drafted_at: datetime


def current_pairs(session: Session, truth: dict[int, SignedReport], study_ids: list[int] | None = None) -> list[Pair]:
    """One pair per study (of `study_ids`, else of all) that has both a ground truth (`truth`, by study id) and a
    draft delivered before it."""
    query = (select(Report.id, Report.study_id, Report.model_version, Report.created_at, func.min(Export.delivered_at))
             .join(Export, Export.report_id == Report.id)
             .where(Export.delivered_at.is_not(None))
             .group_by(Report.id, Report.study_id, Report.model_version, Report.created_at))
    if study_ids is not None:
        query = query.where(Report.study_id.in_(study_ids))
    delivered = session.execute(query)
    seen: dict[int, Pair] = {}
    for report_id, study_id, model_version, created_at, first_delivered in delivered:
        signed = truth.get(study_id)
        if signed is None or first_delivered > signed.received_at:
            continue  # no ground truth, or delivered after the report was signed: not the draft that was edited
        held = seen.get(study_id)
        if held is None or (created_at, report_id) > (held.drafted_at, held.report_id):
            seen[study_id] = Pair(study_id, report_id, signed.id, model_version, created_at)
    return sorted(seen.values(), key=lambda pair: pair.study_id)


def update_quality(db: Database, study_ids: list[int] | None = None) -> int:
    """Score every current pair (of `study_ids`, else of all studies) that has no quality row yet; returns how many
    were added."""
    with db.read() as session:
        done_query = select(ReportQuality.report_id, ReportQuality.signed_report_id)
        if study_ids is not None:
            done_query = done_query.join(Report, Report.id == ReportQuality.report_id).where(
                Report.study_id.in_(study_ids))
        done = set(map(tuple, session.execute(done_query)))
        todo = [pair for pair in current_pairs(session, ground_truth_by_study(session, study_ids), study_ids)
                if (pair.report_id, pair.signed_report_id) not in done]
        drafts = _texts(session, Report.id, Report.findings, [pair.report_id for pair in todo])
        signed = _texts(session, SignedReport.id, SignedReport.text, [pair.signed_report_id for pair in todo])
    if not todo:
        return 0
    scores = score_pairs([drafts[pair.report_id] for pair in todo], [signed[pair.signed_report_id] for pair in todo])
    now = utcnow()
    try:
        with db.session() as session:
            for pair, (bleu_4, rouge_l, chexpert) in zip(todo, scores):
                session.add(ReportQuality(report_id=pair.report_id, signed_report_id=pair.signed_report_id,
                                          bleu_4=bleu_4, rouge_l=rouge_l, chexpert=json.dumps(chexpert),
                                          model_version=pair.model_version, computed_at=now))
    except IntegrityError:
        log.info("quality already recorded by a concurrent run", pairs=len(todo))
        return 0
    log.info("quality recorded", pairs=len(todo))
    return len(todo)


def _texts(session: Session, key, column, ids: list[int]) -> dict[int, str]:
    """Texts by id, fetched in chunks that stay under SQLite's limit on bound parameters."""
    texts = {}
    for start in range(0, len(ids), TEXT_CHUNK):
        texts.update(map(tuple, session.execute(select(key, column).where(key.in_(ids[start:start + TEXT_CHUNK])))))
    return texts


def score_pairs(drafts: list[str], signed: list[str]) -> list[tuple[float, float, dict]]:
    """(BLEU-4, ROUGE-L, per-observation labels) of each draft against its signed report."""
    res = {i: [clean_report(text, "mimic_cxr")] for i, text in enumerate(drafts)}
    gts = {i: [clean_report(text, "mimic_cxr")] for i, text in enumerate(signed)}
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
    _, rouge = Rouge().compute_score(gts, res)
    results = []
    for i, (draft, truth) in enumerate(zip(drafts, signed)):
        draft_labels, signed_labels = label_report(draft), label_report(truth)
        chexpert = {name: {"signed": signed_labels[name], "draft": draft_labels[name]} for name in OBSERVATIONS}
        results.append((float(bleu[3][i]), float(rouge[i]), chexpert))
    return results


def summarise(session: Session, since: datetime | None = None) -> dict:
    """Per model version and month of the draft: studies compared, mean BLEU-4 and ROUGE-L, CE agreement, micro F1."""
    rows = {(q.report_id, q.signed_report_id): q for q in session.scalars(select(ReportQuality))}
    groups: dict[tuple[str, str], list[ReportQuality]] = defaultdict(list)
    truth = ground_truth_by_study(session)
    pairs = current_pairs(session, truth)
    for pair in pairs:
        row = rows.get((pair.report_id, pair.signed_report_id))
        if row is not None and (since is None or pair.drafted_at >= since):
            groups[(pair.model_version, pair.drafted_at.strftime("%Y-%m"))].append(row)
    return {
        "groups": [{"model_version": version, "month": month, **_scores(members)}
                   for (version, month), members in sorted(groups.items())],
        "signed_reports": session.scalar(select(func.count(SignedReport.id))) or 0,
        "studies_with_ground_truth": len(truth),
        "studies_without_delivered_draft": len(truth) - len(pairs),
        "kept_aside": kept_aside_count(session),
        "not_yet_scored": sum((p.report_id, p.signed_report_id) not in rows for p in pairs),
    }


def _scores(members: list[ReportQuality]) -> dict:
    labels = [json.loads(member.chexpert) for member in members]
    signed = [{name: pair["signed"] for name, pair in study.items()} for study in labels]
    drafts = [{name: pair["draft"] for name, pair in study.items()} for study in labels]
    agree = sum((truth[name] == POSITIVE) == (guess[name] == POSITIVE)
                for truth, guess in zip(signed, drafts) for name in OBSERVATIONS)
    return {
        "studies": len(members),
        "bleu_4": sum(m.bleu_4 for m in members) / len(members),
        "rouge_l": sum(m.rouge_l for m in members) / len(members),
        "ce_agreement": agree / (len(members) * len(OBSERVATIONS)),
        "ce_micro_f1": efficacy_from_labels(signed, drafts)["micro_f1"],
    }
