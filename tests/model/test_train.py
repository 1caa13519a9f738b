"""Training mechanics on a few tiny phantom studies: seeded repeatability, exact resume, fine-tuning, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from riha_model.checkpoint import load_checkpoint
from riha_model.errors import RihaModelError
from riha_model.phantoms import write_phantoms
from riha_model.train import LR_BACKBONE, LR_HEAD, RECIPES, state_path, train_model

SMALL = {"image_size": 32}


@pytest.fixture(scope="module")
def few_phantoms(tmp_path_factory):
    """Ten phantom studies at 32 px: 7 train (two batches of 4), 1 val, 2 test."""
    return write_phantoms(tmp_path_factory.mktemp("few"), 10, seed=3, image_size=32)


def run(few_phantoms, out, **options):
    settings = dict(preset="tiny", batch_size=4, seed=0, device="cpu", config_overrides=SMALL)
    return train_model(few_phantoms, out, **{**settings, **options})


def latest_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The weights at the end of the last epoch (the checkpoint itself holds the best epoch's)."""
    return torch.load(state_path(checkpoint), weights_only=True)["model"]


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def one_epoch(few_phantoms, tmp_path_factory):
    """Two training steps with seed 0, the start of both the repeatability and the resume checks."""
    out = tmp_path_factory.mktemp("one") / "one.riha"
    return run(few_phantoms, out, epochs=1)


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(few_phantoms, one_epoch, tmp_path):
    again = run(few_phantoms, tmp_path / "again.riha", epochs=1)
    assert_same_weights(latest_weights(one_epoch.checkpoint), latest_weights(again.checkpoint))
    # The checkpoint's content is the same, header included. (Not its bytes: safetensors writes the header's
    # metadata entries in hash order, which changes from process to process.)
    first, second = load_checkpoint(one_epoch.checkpoint), load_checkpoint(again.checkpoint)
    assert_same_weights(first.model.state_dict(), second.model.state_dict())
    assert (first.metadata, first.metrics, first.config) == (second.metadata, second.metrics, second.config)

    other = run(few_phantoms, tmp_path / "other.riha", epochs=1, seed=1)
    assert not torch.equal(latest_weights(other.checkpoint)["logit.weight"],
                           latest_weights(one_epoch.checkpoint)["logit.weight"])


def test_resume_continues_exactly_where_the_run_stopped(few_phantoms, one_epoch, tmp_path):
    straight = run(few_phantoms, tmp_path / "straight.riha", epochs=2)
    resumed = run(few_phantoms, tmp_path / "resumed.riha", epochs=2, resume=one_epoch.checkpoint)
    assert_same_weights(latest_weights(straight.checkpoint), latest_weights(resumed.checkpoint))
    assert [record["epoch"] for record in resumed.history] == [1, 2]
    assert resumed.history[1]["loss"] == pytest.approx(straight.history[1]["loss"], rel=1e-6)
    assert load_checkpoint(resumed.checkpoint).metadata["epochs"] == resumed.best_epoch

    with pytest.raises(RihaModelError, match="No epoch is left to train"):
        run(few_phantoms, tmp_path / "resumed.riha", epochs=2, resume=tmp_path / "resumed.riha")
    with pytest.raises(RihaModelError, match=r"No training state .*nothing\.riha\.train-state"):
        run(few_phantoms, tmp_path / "x.riha", resume=tmp_path / "nothing.riha")


def test_a_checkpoint_records_the_recipe_the_data_and_its_validation_scores(one_epoch, few_phantoms):
    checkpoint = load_checkpoint(one_epoch.checkpoint)
    metadata = checkpoint.metadata
    assert metadata["dataset"] == "iu_xray" and metadata["seed"] == 0 and metadata["preset"] == "tiny"
    assert metadata["data_counts"] == {"train": 7, "val": 1, "test": 2}
    assert metadata["parent_sha256"] is None
    assert metadata["recipe"] == {"epochs": 1, "batch_size": 4, "lr": LR_HEAD, "lr_backbone": LR_BACKBONE,
                                  "lr_step": RECIPES["iu_xray"].lr_step, "lr_gamma": RECIPES["iu_xray"].lr_gamma,
                                  "augment": True, "keep": "best"}
    validation = checkpoint.metrics["val"]
    assert {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"} <= validation.keys()
    assert validation["BLEU_4"] == one_epoch.best_metrics["BLEU_4"]
    assert {"micro_f1", "macro_f1", "per_observation_f1"} <= validation["clinical_efficacy"].keys()
    assert checkpoint.config.image_size == 32 and checkpoint.config.max_seq_len == 60


def test_fine_tuning_keeps_the_parent_vocabulary_and_names_the_parent(one_epoch, tmp_path):
    parent = load_checkpoint(one_epoch.checkpoint)
    site = write_phantoms(tmp_path / "site", 5, seed=9, image_size=32)  # other reports: other word counts
    child = train_model(site, tmp_path / "child.riha", init=one_epoch.checkpoint, epochs=1, batch_size=4,
                        device="cpu", lr=1e-5)
    loaded = load_checkpoint(child.checkpoint)
    assert loaded.tokenizer == parent.tokenizer and loaded.config == parent.config
    assert loaded.metadata["parent_sha256"] == parent.sha256
    assert loaded.metadata["data_counts"]["train"] == 3
    assert not torch.equal(loaded.model.logit.weight, parent.model.logit.weight)


def test_keep_last_writes_the_last_validated_epoch_whatever_its_score(few_phantoms, tmp_path):
    result = run(few_phantoms, tmp_path / "last.riha", epochs=3, keep="last")
    checkpoint = load_checkpoint(result.checkpoint)
    assert result.best_epoch == 3 and checkpoint.metadata["epochs"] == 3
    assert checkpoint.metrics["val"]["BLEU_4"] == result.history[-1]["val_BLEU_4"]
    assert_same_weights(latest_weights(result.checkpoint), checkpoint.model.state_dict())


def test_training_option_errors_are_clear(few_phantoms, tmp_path):
    with pytest.raises(RihaModelError, match="keep='newest'"):
        run(few_phantoms, tmp_path / "a.riha", keep="newest")
    with pytest.raises(RihaModelError, match="either --resume .* or --init"):
        run(few_phantoms, tmp_path / "a.riha", resume=tmp_path / "r.riha", init=tmp_path / "i.riha")
    with pytest.raises(RihaModelError, match=r"Checkpoint .*missing\.riha does not exist"):
        run(few_phantoms, tmp_path / "a.riha", init=tmp_path / "missing.riha")
    with pytest.raises(RihaModelError, match="no CUDA GPU is available|Device 'cuda:7' does not exist"):
        run(few_phantoms, tmp_path / "a.riha", device="cuda:7")
    with pytest.raises(RihaModelError, match="not a device name|not supported"):
        run(few_phantoms, tmp_path / "a.riha", device="tpu")
    annotation = json.loads(few_phantoms.read_text())
    only_train = tmp_path / "only_train.json"
    only_train.write_text(json.dumps({"train": annotation["train"]}))
    with pytest.raises(RihaModelError, match=r"The 'val' split of .*only_train\.json has no studies"):
        train_model(only_train, tmp_path / "a.riha", images=few_phantoms.parent / "images", device="cpu")
