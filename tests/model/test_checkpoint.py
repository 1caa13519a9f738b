"""The one-file checkpoint: a round trip generates the same reports; every kind of bad file is one clear error."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from riha_model.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from riha_model.errors import RihaModelError
from tests.model.test_model_forward import make_batch, make_model, tokenizer  # noqa: F401


@pytest.fixture()
def saved(tmp_path):
    model = make_model(seed=4, rpe="sinusoidal").eval()
    path = tmp_path / "model.safetensors"
    sha256 = save_checkpoint(path, model, model.config, tokenizer().to_dict(), {"epochs": 3, "dataset": "iu_xray"},
                             {"BLEU_4": 0.12})
    return model, path, sha256


def rewrite_header(source, target, **changes):
    """Copy a checkpoint with some header entries replaced (None removes one)."""
    with safe_open(str(source), framework="pt") as reader:
        header = reader.metadata()
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    header.update(changes)
    save_file(tensors, str(target), metadata={key: value for key, value in header.items() if value is not None})


def test_round_trip_generates_identical_reports(saved):
    model, path, sha256 = saved
    loaded = load_checkpoint(path)
    assert loaded.sha256 == sha256 and len(sha256) == 64
    assert loaded.config == model.config and not loaded.model.training
    assert loaded.tokenizer == tokenizer().to_dict()
    assert loaded.metadata == {"epochs": 3, "dataset": "iu_xray", "format_version": FORMAT_VERSION}
    assert loaded.metrics == {"BLEU_4": 0.12}
    batch = make_batch([2, 1], seed=3)
    expected = model.generate(batch.images, batch.view_mask, batch.view_ids, max_len=10)
    assert loaded.model.generate(batch.images, batch.view_mask, batch.view_ids, max_len=10) == expected
    assert all(parameter.requires_grad for parameter in loaded.model.parameters())  # fine-tuning can resume
    assert not list(path.parent.glob("*.partial"))


def test_a_missing_file(tmp_path):
    with pytest.raises(RihaModelError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_file(saved, keep):
    _, path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(RihaModelError, match="damaged or truncated"):
        load_checkpoint(path)


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 64 + b"not a checkpoint")
    with pytest.raises(RihaModelError, match="damaged or truncated"):
        load_checkpoint(path)


def test_a_flipped_byte_in_the_weights(saved):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RihaModelError, match="do not match the hash"):
        load_checkpoint(path)


def test_a_wrong_format_version(saved, tmp_path):
    _, path, _ = saved
    rewrite_header(path, tmp_path / "v9.safetensors", format_version="9")
    with pytest.raises(RihaModelError, match="format version 9"):
        load_checkpoint(tmp_path / "v9.safetensors")


def test_a_safetensors_file_that_is_no_riha_checkpoint(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RihaModelError, match="not a RIHA checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_a_config_that_does_not_fit_the_weights(saved, tmp_path):
    model, path, _ = saved
    bigger = {**model.config.to_dict(), "d_model": 256}
    rewrite_header(path, tmp_path / "mismatch.safetensors", config=json.dumps(bigger))
    with pytest.raises(RihaModelError, match="weights do not fit its configuration.*other shape: "):
        load_checkpoint(tmp_path / "mismatch.safetensors")
    other_rpe = {**model.config.to_dict(), "rpe": "bias"}
    rewrite_header(path, tmp_path / "rpe.safetensors", config=json.dumps(other_rpe))
    with pytest.raises(RihaModelError, match="missing: decoder.relative_bias.table.weight; unexpected: "
                                             "decoder.position.scale, decoder.position.table"):
        load_checkpoint(tmp_path / "rpe.safetensors")


def test_a_config_from_another_version(saved, tmp_path):
    model, path, _ = saved
    changed = {**model.config.to_dict(), "colour": "blue"}
    del changed["grid_size"]
    rewrite_header(path, tmp_path / "keys.safetensors", config=json.dumps(changed))
    with pytest.raises(RihaModelError, match="unknown keys: colour; missing keys: grid_size"):
        load_checkpoint(tmp_path / "keys.safetensors")


def test_a_header_without_its_config(saved, tmp_path):
    _, path, _ = saved
    rewrite_header(path, tmp_path / "noconfig.safetensors", config=None)
    with pytest.raises(RihaModelError, match="damaged header"):
        load_checkpoint(tmp_path / "noconfig.safetensors")


def test_a_vocabulary_that_does_not_fit_the_output_layer(saved, tmp_path):
    _, path, _ = saved
    vocabulary = tokenizer().to_dict()
    vocabulary["tokens"] = vocabulary["tokens"][:-1]
    rewrite_header(path, tmp_path / "vocab.safetensors", tokenizer=json.dumps(vocabulary))
    with pytest.raises(RihaModelError, match="vocabulary of"):
        load_checkpoint(tmp_path / "vocab.safetensors")
