"""R2Gen cleaning and vocabulary on the real IU-Xray reports; sentence and phrase splitting."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from riha_model.errors import RihaModelError
from riha_model.text import Tokenizer, clean_report, split_phrases, split_sentences

ANNOTATION = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "iu_xray" / "annotation.json"


@pytest.fixture(scope="module")
def iu():
    return json.loads(ANNOTATION.read_text())


@pytest.fixture(scope="module")
def reports_by_id(iu):
    return {entry["id"]: entry["report"] for split in iu.values() for entry in split}


@pytest.mark.parametrize(("study", "cleaned"), [
    # list numbering "1. " .. "5. " removed, slashes dropped inside words
    ("CXR3260_IM-1547",
     "cardiomegaly andor pericardial effusion . right base opacity xxxx combination of pleural effusion and "
     "atelectasisairspace disease . cannot exclude elevation right hemidiaphragm . left lung relatively clear . "
     "limited exam due to underpenetrated technique related to large patient habitus . "
     "no evidence of pneumothorax ."),
    # a stray final ". " leaves an empty sentence, which R2Gen keeps
    ("CXR1677_IM-0446",
     "the cardiac and mediastinal silhouettes are unremarkable . the lungs are well expanded and clear . "
     "there is no focal air space opacity pneumothorax or effusion . the bony structures of the thorax are intact "
     "with no evidence of acute abnormality .  ."),
    # ".." collapses, commas go
    ("CXR1647_IM-0424",
     "the lungs are clear bilaterally . specifically no evidence of focal consolidation pneumothorax or pleural "
     "effusion . cardio mediastinal silhouette is unremarkable . visualized osseous structures of the thorax are "
     "without acute abnormality ."),
    # colons go, hyphens stay
    ("CXR3263_IM-1549",
     "chest the heart size and cardiomediastinal silhouette are normal . the lungs are clear without focal "
     "airspace opacity pleural effusion or pneumothorax . the osseous structures are intact . left knee there is "
     "no fracture-dislocation . there are degenerative changes with medial compartment osteophytes . there is no "
     "suprapatellar effusion . there is a xxxx ."),
])
def test_iu_cleaning_matches_hand_checked_real_reports(reports_by_id, study, cleaned):
    assert clean_report(reports_by_id[study], "iu_xray") == cleaned


def test_decimal_points_vanish_as_in_r2gen():
    assert clean_report("Nodule measures 2.0 cm. Heart < normal = ok.") == "nodule measures 20 cm . heart  normal  ok ."


def test_mimic_cleaning_collapses_underscores_spaces_and_newlines():
    raw = ("FINDINGS:\n\nPA and lateral views ___ ___ of the chest..  1. No  focal consolidation. "
           "2. Heart size is normal.")
    assert clean_report(raw, "mimic_cxr") == (
        "findings pa and lateral views   of the chest . no focal consolidation . heart size is normal .")
    # the IU chain does none of that
    assert clean_report(raw, "iu_xray") == (
        "findings\n\npa and lateral views   of the chest . no  focal consolidation . heart size is normal .")


def test_unknown_dataset_is_named():
    with pytest.raises(RihaModelError, match="openi"):
        clean_report("Clear lungs.", "openi")


def test_iu_vocabulary_is_r2gens(iu):
    train = [entry["report"] for entry in iu["train"]]
    tokenizer = Tokenizer.build(train, threshold=3, dataset="iu_xray")
    # independent count: every whitespace token of the cleaned training reports seen at least 3 times
    counts = defaultdict(int)
    for report in train:
        for token in clean_report(report).split(" "):
            if token:
                counts[token] += 1
    expected = sorted([token for token, count in counts.items() if count >= 3] + ["<unk>"])
    assert [tokenizer.idx2token[i] for i in range(1, len(expected) + 1)] == expected
    # R2Gen's published IU vocabulary: 760 tokens with <unk>, an output layer of 761
    assert len(expected) == 760
    assert tokenizer.vocab_size == 761


def test_encode_decode_round_trip_and_unknown_words(iu):
    tokenizer = Tokenizer.build([entry["report"] for entry in iu["train"]], threshold=3)
    report = iu["test"][0]["report"]
    ids = tokenizer.encode(report)
    assert ids[0] == 0 and ids[-1] == 0 and 0 not in ids[1:-1]
    assert tokenizer.decode(ids[1:]) == clean_report(report)
    unknown = tokenizer.token2idx["<unk>"]
    assert tokenizer.encode("The zzyzx is clear.") == [0, tokenizer.token2idx["the"], unknown,
                                                       tokenizer.token2idx["is"], tokenizer.token2idx["clear"],
                                                       tokenizer.token2idx["."], 0]
    assert tokenizer.decode([tokenizer.token2idx["heart"], 0, tokenizer.token2idx["lungs"]]) == "heart"
    with pytest.raises(RihaModelError, match="outside this vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_max_length_cuts_like_r2gens_dataset():
    tokenizer = Tokenizer.build(["the heart is normal ."] * 3, threshold=3)
    full = tokenizer.encode("The heart is normal.")
    assert len(full) == 7
    assert tokenizer.encode("The heart is normal.", max_length=4) == full[:4]  # BOS + 3 tokens, no closing 0
    assert tokenizer.encode("The heart is normal.", max_length=60) == full


def test_threshold_and_dict_round_trip():
    tokenizer = Tokenizer.build(["Heart normal.", "Heart enlarged.", "Heart normal."], threshold=2)
    assert sorted(tokenizer.token2idx) == [".", "<unk>", "heart", "normal"]
    assert list(tokenizer.token2idx.values()) == [1, 2, 3, 4]
    restored = Tokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored == tokenizer and restored.vocab_size == 5
    with pytest.raises(RihaModelError, match="tokens"):
        Tokenizer.from_dict({"dataset": "iu_xray"})


def test_split_sentences_handles_raw_and_cleaned_reports():
    raw = "Heart size is normal. Lungs are clear!\nNo effusion measuring 2.5 cm."
    assert split_sentences(raw) == ["Heart size is normal", "Lungs are clear", "No effusion measuring 2.5 cm"]
    cleaned = clean_report(raw)
    assert split_sentences(cleaned) == ["heart size is normal", "lungs are clear", "no effusion measuring 25 cm"]
    assert split_sentences("the heart is normal .  .") == ["the heart is normal"]


def test_split_phrases_keeps_clinical_terms():
    assert split_phrases("no pneumothorax or pleural effusion is seen") == ["pneumothorax", "pleural effusion"]
    assert split_phrases("The heart size and pulmonary vascularity appear within normal limits") == [
        "heart size", "pulmonary vascularity", "normal limits"]
    assert split_phrases("there is a large hiatal hernia") == ["large hiatal hernia"]
    assert split_phrases("is the") == []
