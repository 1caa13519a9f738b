"""`riha-node train`, `evaluate` and `generate` end to end through the riha-node command group."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from riha_model.checkpoint import load_checkpoint
from riha_model.phantoms import write_phantoms
from riha_node.cli import main
from riha_node.cli_model import CLINICAL_KEYS, COMMANDS, EVALUATION_KEYS


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_the_commands_are_exposed_to_the_group():
    assert [command.name for command in COMMANDS] == ["train", "evaluate", "generate"]
    assert {"train", "evaluate", "generate"} <= set(main.commands)


def test_train_writes_a_checkpoint(tmp_path):
    annotation = write_phantoms(tmp_path / "phantoms", 6, seed=2, image_size=32)
    out = tmp_path / "model.riha"
    result = invoke("train", "--data", annotation, "--images", annotation.parent / "images", "--preset", "tiny",
                    "--out", out, "--epochs", "1", "--batch-size", "4", "--seed", "4", "--no-augment",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "validation BLEU-4" in result.output
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["seed"] == 4 and checkpoint.metadata["recipe"]["batch_size"] == 4
    assert checkpoint.metadata["recipe"]["augment"] is False
    assert checkpoint.config.image_size == 128  # the tiny preset as it is

    result = invoke("train", "--data", annotation, "--out", tmp_path / "again.riha", "--resume", out,
                    "--init", out)
    assert_one_line_error(result, "either --resume", "or --init")


def test_the_phantom_recipe_fills_unset_options_and_given_ones_win(tmp_path):
    annotation = write_phantoms(tmp_path / "phantoms", 6, seed=3, image_size=64)
    weights = tmp_path / "resnet18.pth"  # a site's local ImageNet weights, here random ones of the same shape
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "phantom.riha"
    result = invoke("train", "--data", annotation, "--recipe", "phantoms", "--out", out, "--epochs", "1",
                    "--backbone-weights", weights, "--device", "cpu")
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(out)
    recipe = checkpoint.metadata["recipe"]
    assert checkpoint.config.image_size == 64 and checkpoint.config.d_model == 128  # tiny at 64 px
    assert checkpoint.config.backbone_weights == str(weights)
    assert recipe["epochs"] == 1 and recipe["batch_size"] == 16  # --epochs given, the batch from the recipe
    assert recipe["lr"] == recipe["lr_backbone"] == 1e-3 and recipe["augment"] is False and recipe["keep"] == "last"


@pytest.mark.slow
def test_under_torchrun_two_processes_train_one_checkpoint(tmp_path):
    """DistributedDataParallel over Gloo on this CPU: the same code path as several GPUs under NCCL."""
    annotation = write_phantoms(tmp_path / "phantoms", 12, seed=3, image_size=64)
    out = tmp_path / "ddp.riha"
    result = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                             "-m", "riha_node.cli", "train", "--data", str(annotation), "--recipe", "phantoms",
                             "--epochs", "2", "--batch-size", "4", "--keep", "last", "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1, result.stdout
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["epochs"] == 2 and checkpoint.metadata["recipe"]["keep"] == "last"
    assert result.stderr.count("epoch 2/2") == 1, "epoch lines come from the first process only"


def test_evaluate_prints_a_table_or_one_json_object(phantom_model):
    checkpoint, annotation = phantom_model.result.checkpoint, phantom_model.annotation
    as_json = invoke("evaluate", "--checkpoint", checkpoint, "--data", annotation, "--split", "val", "--json",
                     "--device", "cpu")
    assert as_json.exit_code == 0, as_json.output
    scores = json.loads(as_json.output)
    assert set(EVALUATION_KEYS) <= scores.keys() and set(CLINICAL_KEYS) <= scores["clinical_efficacy"].keys()
    assert scores["studies"] == len(json.loads(annotation.read_text())["val"])
    assert 0.0 <= scores["BLEU_4"] <= scores["BLEU_1"] <= 1.0

    table = invoke("evaluate", "--checkpoint", checkpoint, "--data", annotation, "--split", "val", "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert f"val split, {scores['studies']} studies" in table.output
    assert "BLEU_4" in table.output and f"{scores['BLEU_4']:.4f}" in table.output
    assert "CE micro_f1" in table.output


def test_generate_drafts_one_report_from_png_or_dicom_files(phantom_model, tmp_path):
    annotation = json.loads(phantom_model.annotation.read_text())
    entry = annotation["test"][0]
    pngs = [phantom_model.annotation.parent / "images" / path for path in entry["image_path"]]
    result = invoke("generate", "--checkpoint", phantom_model.result.checkpoint, "--device", "cpu", *pngs)
    assert result.exit_code == 0, result.output
    report = result.output.strip()
    assert len(result.output.splitlines()) == 1 and report[0].isupper() and report.endswith(".")

    dicom_set = write_phantoms(tmp_path / "dicom", 3, seed=1, dicom=True, image_size=64)
    dicom_files = sorted((dicom_set.parent / "dicom").glob("*/*.dcm"))[:2]
    result = invoke("generate", "--checkpoint", phantom_model.result.checkpoint, "--device", "cpu", *dicom_files)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(".")


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "--checkpoint", "{tmp}/missing.riha", "--data", "{annotation}"], ["missing.riha does not exist"]),
    (["generate", "--checkpoint", "{tmp}/missing.riha", "{image}"], ["missing.riha does not exist"]),
    (["generate", "--checkpoint", "{checkpoint}", "{tmp}/nothing.png"], ["nothing.png does not exist"]),
    (["evaluate", "--checkpoint", "{tmp}/fake.riha", "--data", "{annotation}"], ["fake.riha is damaged"]),
], ids=["evaluate-missing-checkpoint", "generate-missing-checkpoint", "generate-missing-image", "not-a-checkpoint"])
def test_user_errors_are_one_line_without_traceback(phantom_model, tmp_path, args, fragments):
    (tmp_path / "fake.riha").write_bytes(b"not a checkpoint")
    annotation = phantom_model.annotation
    values = {"tmp": tmp_path, "annotation": annotation, "checkpoint": phantom_model.result.checkpoint,
              "image": annotation.parent / "images" / json.loads(annotation.read_text())["test"][0]["image_path"][0]}
    result = invoke(*[arg.format(**values) for arg in args])
    assert_one_line_error(result, *fragments)
