"""`riha-node train`, `evaluate` and `generate`: the RIHA model from the command line.

User errors (missing file, bad dataset, wrong device) are raised as RihaModelError, which the riha-node group
(riha_node.cli) prints as one line with a non-zero exit status.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from riha_model.errors import RihaModelError

EVALUATION_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CLINICAL_KEYS = ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1")


def _file_errors(command):
    """An unreadable or unwritable file (OSError) becomes a RihaModelError, which the riha-node group prints as one
    line with a non-zero exit, like every other user error."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OSError as exc:
            raise RihaModelError(f"Cannot use {exc.filename or 'a file'}: {exc.strerror or exc}.") from exc
    return wrapper


def _log_to_stderr() -> None:
    """Epoch lines from riha_model.train on stderr (the progress bar, on a terminal, is tqdm's)."""
    logger = logging.getLogger("riha_model")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


DEVICE_HELP = "auto (a GPU when there is one), cpu or cuda:N."
existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command(name="train")
@click.option("--data", required=True, type=existing_file, help="R2Gen annotation.json or a .jsonl manifest.")
@click.option("--images", type=existing_dir, help="Folder the image paths are relative to.")
@click.option("--preset", type=click.Choice(["tiny", "paper"]),
              help="Model size: tiny (the default) trains on a CPU in minutes, paper is the reference's.")
@click.option("--recipe", type=click.Choice(["reference", "phantoms"]), default="reference", show_default=True,
              help="Where unset options come from: the reference's recipe for the dataset, or the one that learns "
                   "phantom studies on a CPU in minutes (tiny at 64 px, lr 1e-3 throughout, no crop or flip).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (the best epoch on validation BLEU-4).")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs (default: the dataset's reference recipe).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Studies per batch (default: the recipe's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate outside the ResNet.")
@click.option("--lr-step", type=click.IntRange(min=1), help="StepLR: epochs between learning-rate drops.")
@click.option("--lr-gamma", type=click.FloatRange(min=0, min_open=True), help="StepLR: factor of each drop.")
@click.option("--validate-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Epochs between validations (the last epoch is always validated).")
@click.option("--keep", type=click.Choice(["best", "last"]),
              help="Write the epoch with the best validation BLEU-4 (the reference recipe), or the last validated one "
                   "(the phantom recipe).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path),
              help="Continue the run that wrote this checkpoint (its .train-state file must sit beside it).")
@click.option("--init", "init", type=click.Path(dir_okay=False, path_type=Path),
              help="Fine-tune this checkpoint, keeping its configuration and vocabulary.")
@click.option("--augment/--no-augment", default=None,
              help="R2Gen's random crop and horizontal flip of training images (the flip mirrors sided findings); "
                   "on in the reference recipe.")
@click.option("--backbone-weights", type=existing_file,
              help="Local ImageNet weights for the ResNet (torchvision state dict, .pth or .safetensors).")
@click.option("--text-encoder", type=existing_dir,
              help="Local transformers encoder folder (e.g. a Bio_ClinicalBERT copy) for the text pyramid.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@_file_errors
def train(data, images, preset, recipe, out, epochs, batch_size, lr, lr_step, lr_gamma, validate_every, keep, seed,
          resume, init, augment, backbone_weights, text_encoder, device):
    """Train (or fine-tune) a RIHA model and write its best checkpoint. Under `torchrun` each process trains its
    share of every batch (DistributedDataParallel: NCCL on GPUs, Gloo on CPUs) and the first one writes the file."""
    from riha_model.api import PHANTOM_TRAINING, train_model
    _log_to_stderr()
    settings = dict(PHANTOM_TRAINING) if recipe == "phantoms" else {"preset": "tiny"}
    given = {"preset": preset, "epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_step": lr_step,
             "lr_gamma": lr_gamma, "augment": augment, "keep": keep}
    settings.update({name: value for name, value in given.items() if value is not None})
    local_files = {"backbone_weights": backbone_weights, "text_encoder_dir": text_encoder}
    settings["config_overrides"] = {**settings.get("config_overrides", {}),
                                    **{key: str(path) for key, path in local_files.items() if path is not None}}
    result = train_model(data=data, images=images, out=out, seed=seed, resume=resume, init=init, device=device,
                         validate_every=validate_every, **settings)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one line, from the process that wrote the file
        click.echo(f"best epoch {result.best_epoch}: validation BLEU-4 {result.best_metrics['BLEU_4']:.4f}; "
                   f"wrote {result.checkpoint} (sha256 {result.sha256[:12]})")


@click.command(name="evaluate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=existing_file, help="R2Gen annotation.json or a .jsonl manifest.")
@click.option("--images", type=existing_dir, help="Folder the image paths are relative to.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_file_errors
def evaluate(checkpoint, data, images, split, batch_size, device, as_json):
    """Score a checkpoint's reports on a split: BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical efficacy."""
    from riha_model.api import evaluate_model
    scores = evaluate_model(checkpoint, data, images=images, split=split, batch_size=batch_size, device=device)
    if as_json:
        click.echo(json.dumps(scores, sort_keys=True))
        return
    clinical = scores["clinical_efficacy"]
    rows = [(key, scores[key]) for key in EVALUATION_KEYS] + [(f"CE {key}", clinical[key]) for key in CLINICAL_KEYS]
    click.echo(f"{split} split, {scores['studies']} studies")
    for name, value in rows:
        click.echo(f"  {name:<20} {'n/a (no Java)' if value is None else f'{value:.4f}'}")


@click.command(name="generate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_file_errors
def generate(checkpoint, device, files):
    """Draft one report from the PNG, JPEG or DICOM images of one study (frontal first), printed to stdout."""
    from riha_model.api import ReportModel
    from riha_model.images import file_view_id, load_image
    arrays = [load_image(path) for path in files]
    view_ids = [file_view_id(path, position) for position, path in enumerate(files)]
    model = ReportModel.load(checkpoint, device=device)
    click.echo(model.generate_reports([arrays], [view_ids])[0])


COMMANDS = [train, evaluate, generate]
