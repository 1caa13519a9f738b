"""`riha-node phantoms` and `riha-node label` through click's test runner."""

import csv
import io
import json

from click.testing import CliRunner

from riha_model.labeler import OBSERVATIONS
from riha_node.cli_data import COMMANDS, label, phantoms


def test_commands_are_exposed():
    assert [command.name for command in COMMANDS] == ["phantoms", "label"]


def test_phantoms_writes_and_says_where(tmp_path):
    out = tmp_path / "ph"
    result = CliRunner().invoke(phantoms, ["--out", str(out), "--studies", "10", "--seed", "2", "--dicom",
                                           "--image-size", "48"])
    assert result.exit_code == 0, result.output
    assert f"wrote 10 phantom studies to {out}: train 7, val 1, test 2" in result.output
    annotation = json.loads((out / "annotation.json").read_text())
    assert sum(len(entries) for entries in annotation.values()) == 10
    assert len(list((out / "dicom").glob("*/*.dcm"))) == 20
    assert len(list((out / "images").glob("*/*.png"))) == 20


def test_phantoms_refuses_a_file_as_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(phantoms, ["--out", str(blocker), "--studies", "3", "--image-size", "32"])
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: Cannot write phantoms to {blocker}")


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows(rows)


def test_label_writes_chexpert_columns(tmp_path):
    source = tmp_path / "reports.csv"
    write_csv(source, [["uid", "findings"],
                       ["a1", "The heart is enlarged. No pleural effusion. Possible consolidation."],
                       ["a2", "Lungs are clear. No pneumothorax."]])
    result = CliRunner().invoke(label, ["--csv", str(source), "--text-column", "findings", "--id-column", "uid"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert list(rows[0]) == ["uid", *OBSERVATIONS]
    assert rows[0]["uid"] == "a1"
    assert (rows[0]["Cardiomegaly"], rows[0]["Pleural Effusion"], rows[0]["Consolidation"]) == ("1.0", "0.0", "-1.0")
    assert rows[0]["No Finding"] == "" and rows[0]["Fracture"] == ""
    assert (rows[1]["No Finding"], rows[1]["Pneumothorax"]) == ("1.0", "0.0")
    numbered = CliRunner().invoke(label, ["--csv", str(source), "--text-column", "findings"])
    assert [row["row"] for row in csv.DictReader(io.StringIO(numbered.output))] == ["1", "2"]


def test_label_errors_are_one_line(tmp_path):
    missing = CliRunner().invoke(label, ["--csv", str(tmp_path / "none.csv"), "--text-column", "findings"])
    assert missing.exit_code != 0
    assert missing.output.strip().splitlines() == [f"Error: CSV file {tmp_path / 'none.csv'} does not exist; "
                                                   "pass an existing file to --csv."]
    source = tmp_path / "reports.csv"
    write_csv(source, [["uid", "impression"], ["1", "Clear."]])
    wrong = CliRunner().invoke(label, ["--csv", str(source), "--text-column", "findings"])
    assert wrong.exit_code != 0
    assert wrong.output.strip().splitlines() == [
        f"Error: Column 'findings' is not in {source}; its columns are uid, impression."]
