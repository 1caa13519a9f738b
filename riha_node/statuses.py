"""DIMSE status codes the node answers with (PS3.4 B.2.3 for Storage, PS3.7 C for the general ones)."""
from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # refused: disk over the watermark or database unavailable; PACS retries later
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # the data set's SOP Class UID differs from the request's
    CANNOT_UNDERSTAND = 0xC000  # the data set cannot be parsed
    INVALID_UID = 0xC001  # a Study/Series/SOP Instance UID is missing or not a valid UID
    PROCESSING_FAILURE = 0x0110  # an unexpected error in the node itself (logged with a traceback)


class EchoStatus(IntEnum):
    SUCCESS = 0x0000
