"""structlog set-up: JSON lines when not on a terminal, readable console lines otherwise.

Log lines carry identifiers (internal study id, StudyInstanceUID, SOP Instance UID, peer AE title), never patient
name, ID, birth date, accession number or report text: callers bind only those keys, and `_drop_patient_keys`
removes any patient attribute that slips into an event anyway.
"""
from __future__ import annotations

import logging
import sys

import structlog

PATIENT_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "accession_number", "report",
                          "report_text", "findings", "impression", "PatientName", "PatientID", "PatientBirthDate",
                          "AccessionNumber"})


def _drop_patient_keys(logger, method_name, event_dict):
    for key in PATIENT_KEYS.intersection(event_dict):
        event_dict[key] = "[withheld]"
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog (and stdlib logging from libraries) to stderr in the chosen format."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_patient_keys,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs whole datasets at debug level (patient data): keep it at warning whatever our level is.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def get_logger(name: str):
    return structlog.get_logger(name)
