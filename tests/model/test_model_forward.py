"""RIHA's training forward: shapes and view masks, gradients to every part, both relative-position variants."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from riha_model.config import RihaConfig
from riha_model.errors import RihaModelError
from riha_model.model import RIHA, Batch, make_text_units
from riha_model.text import Tokenizer, clean_report


DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
IMAGE_SIZE = 64


@lru_cache(maxsize=1)
def iu_reports() -> tuple[str, ...]:
    """Cleaned IU-Xray reports (real text) for the vocabulary and the text units."""
    annotation = json.loads((DATA / "iu_xray" / "annotation.json").read_text())
    return tuple(clean_report(entry["report"]) for entry in annotation["train"][:300])


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.build(iu_reports(), threshold=3)


def tiny_config(**overrides) -> RihaConfig:
    return RihaConfig.preset("tiny", image_size=IMAGE_SIZE, **overrides)


def make_model(seed: int = 0, **overrides) -> RIHA:
    torch.manual_seed(seed)
    return RIHA(tiny_config(**overrides), tokenizer().vocab_size)


def make_batch(views_per_study: list[int], seed: int = 0, max_views: int | None = None,
               config: RihaConfig | None = None) -> Batch:
    """Studies with the given numbers of real views (padded to max_views) and real reports."""
    config = config or tiny_config()
    generator = torch.Generator().manual_seed(seed)
    batch_size, width = len(views_per_study), max_views or max(views_per_study)
    reports = [iu_reports()[(seed + i) % len(iu_reports())] for i in range(batch_size)]
    ids = [tokenizer().encode(report, config.max_seq_len) for report in reports]
    tokens = torch.zeros(batch_size, max(map(len, ids)), dtype=torch.long)
    token_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, sequence in enumerate(ids):
        tokens[i, :len(sequence)], token_mask[i, :len(sequence)] = torch.tensor(sequence), True
    view_mask = torch.arange(width)[None, :] < torch.tensor(views_per_study)[:, None]
    return Batch(images=torch.randn(batch_size, width, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
                 view_mask=view_mask, view_ids=torch.arange(width).clamp(max=2).expand(batch_size, -1).clone(),
                 tokens=tokens, token_mask=token_mask, text_units=make_text_units(reports, tokenizer(), config))


def decoder_logits(model: RIHA, batch: Batch) -> torch.Tensor:
    """Next-token logits of the teacher-forced reports."""
    from riha_model.model import training_self_mask
    encoded, src_mask, _ = model.encode(batch.images, batch.view_mask, batch.view_ids)
    inputs = batch.tokens[:, :-1]
    hidden = model.decoder(inputs, model.decoder.cross_kv(encoded), src_mask, training_self_mask(inputs))
    return model.logit(hidden)


def test_forward_returns_the_losses_and_visual_tokens_follow_the_views():
    model = make_model()
    batch = make_batch([1, 2, 3])
    out = model(batch)
    for key in ("loss", "lm_loss", "cha_loss", "cha_word", "cha_sentence", "cha_paragraph", "cha_guard"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["lm_loss"] > 0 and out["cha_loss"] > 0
    config = model.config
    assert torch.allclose(out["loss"], out["lm_loss"] + config.cha_weight * out["cha_loss"])
    cells = config.grid_size ** 2
    encoded, src_mask, visual = model.encode(batch.images, batch.view_mask, batch.view_ids)
    assert encoded.shape == (3, 3 * cells, config.d_model)
    assert src_mask[:, 0].sum(1).tolist() == [cells, 2 * cells, 3 * cells]
    assert len(visual.levels) == 4 and all(level.shape == encoded.shape for level in visual.levels)


@pytest.mark.parametrize("real_views, padded_to", [(1, 2), (1, 3), (2, 3)])
def test_a_padded_view_does_not_change_the_real_ones(real_views, padded_to):
    model = make_model().eval()
    alone = make_batch([real_views], seed=3)
    padded = make_batch([real_views], seed=3, max_views=padded_to)
    padded.images[:, :real_views] = alone.images
    padded.images[:, real_views:] = 7.0  # whatever sits in a padded slot must not matter
    with torch.no_grad():
        assert torch.allclose(decoder_logits(model, alone), decoder_logits(model, padded), atol=1e-5)
        assert torch.allclose(model(alone)["loss"], model(padded)["loss"], atol=1e-5)


def test_a_study_is_encoded_the_same_alone_and_beside_others():
    model = make_model().eval()
    mixed = make_batch([2, 3, 1], seed=5)
    alone = Batch(images=mixed.images[:1, :2], view_mask=mixed.view_mask[:1, :2], view_ids=mixed.view_ids[:1, :2],
                  tokens=mixed.tokens[:1], token_mask=mixed.token_mask[:1])
    with torch.no_grad():
        together = decoder_logits(model, mixed)[:1]
        assert torch.allclose(decoder_logits(model, alone), together, atol=1e-5)


def test_every_part_receives_gradient():
    model = make_model()
    model(make_batch([2, 1, 3], seed=1))["loss"].backward()
    parts = {
        "backbone": list(model.backbone_parameters()),
        "pyramid projections": list(model.vfp.project.parameters()),
        "level fusion": [model.vfp.level_logits],
        "view embedding": [model.vfp.view_embed.weight],
        "text pyramid": list(model.tfp.parameters()),
        **{f"cha {side} {level}": list(getattr(model.cha, f"{side}_proj")[level].parameters())
           for side in ("visual", "text") for level in ("word", "sentence", "paragraph")},
        "encoder": list(model.encoder.parameters()),
        "relational memory": list(model.decoder.memory.parameters()),
        "decoder layers": list(model.decoder.layers.parameters()),
        "relative position bias": [model.decoder.relative_bias.table.weight],
        "output layer": list(model.logit.parameters()),
    }
    for name, parameters in parts.items():
        assert all(p.grad is not None for p in parameters), name
        assert sum(p.grad.abs().sum() for p in parameters) > 0, name
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("rpe", ["bias", "sinusoidal"])
def test_both_relative_position_variants_train_and_generate(rpe):
    model = make_model(rpe=rpe)
    batch = make_batch([2, 2], seed=2)
    out = model(batch)
    out["loss"].backward()
    if rpe == "bias":
        assert model.decoder.position is None and model.decoder.relative_bias.table.weight.grad.abs().sum() > 0
    else:
        assert model.decoder.relative_bias is None and model.decoder.position.scale.grad is not None
    generated = model.generate(batch.images, batch.view_mask, batch.view_ids, max_len=6)
    assert len(generated) == 2 and all(1 <= len(ids) <= 6 for ids in generated)


def test_without_text_units_there_is_no_alignment_loss():
    model = make_model()
    batch = make_batch([1, 2])
    batch.text_units = None
    out = model(batch)
    assert out["cha_loss"] == 0 and torch.equal(out["loss"], out["lm_loss"])


def test_text_units_are_spans_of_the_report_at_three_levels():
    config = tiny_config(max_phrases=4)
    report = "the heart is normal in size . no pleural effusion or pneumothorax is seen ."
    units = make_text_units([report, "no acute disease ."], tokenizer(), config)
    words = report.split()
    assert units.ids[0, :len(words)].tolist() == [tokenizer().token_id(word) for word in words]
    assert units.ids[1, 4:].eq(0).all()
    assert units.paragraph.texts == [[report], ["no acute disease ."]]
    assert units.sentence.texts[0] == ["the heart is normal in size", "no pleural effusion or pneumothorax is seen"]
    assert units.sentence.spans[0].tolist() == [[0, 6], [7, 14]]
    assert units.word.texts[0] == ["heart", "normal", "size", "pleural effusion"]  # max_phrases cuts the fifth
    assert units.word.spans[0].tolist() == [[1, 2], [3, 4], [5, 6], [8, 10]]
    assert units.word.mask.tolist() == [[True] * 4, [True, False, False, False]]
    assert units.word.texts[1] == ["acute disease"] and units.word.spans[1, 0].tolist() == [1, 3]


def test_units_beyond_the_length_limit_are_left_out():
    units = make_text_units(["heart normal . lungs clear . no effusion ."], tokenizer(), tiny_config(max_seq_len=5))
    assert units.ids.shape == (1, 5)
    assert units.sentence.texts == [["heart normal", "lungs clear"]]
    assert units.word.texts == [["heart normal", "lungs clear"]]


def test_the_text_pyramid_averages_word_states_over_each_unit():
    model = make_model().eval()
    units = make_text_units(["heart normal . lungs clear ."], tokenizer(), model.config)
    with torch.no_grad():
        vectors = model.tfp(units)
        x = model.tfp.embed(units.ids) + model.tfp.position[:units.ids.shape[1]]
        states = model.tfp.encoder(x)[0]
    torch.testing.assert_close(vectors["sentence"][0][0, 1], states[3:5].mean(0))
    torch.testing.assert_close(vectors["paragraph"][0][0, 0], states.mean(0))


def test_a_study_without_views_is_refused():
    model = make_model()
    batch = make_batch([1, 1])
    batch.view_mask[1] = False
    with pytest.raises(RihaModelError, match="no image"):
        model(batch)


def test_backbone_weights_come_from_a_local_file(tmp_path):
    import torchvision
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = make_model(backbone_weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.vfp.stem[0].weight, resnet.conv1.weight)
    assert torch.equal(model.vfp.stages[3][1].conv2.weight, resnet.layer4[1].conv2.weight)
    with pytest.raises(RihaModelError, match="does not exist"):
        make_model(backbone_weights=str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(RihaModelError, match="does not hold resnet18 weights"):
        make_model(backbone_weights=str(tmp_path / "resnet34.pth"))


def test_a_frozen_transformers_encoder_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({word for report in iu_reports()[:50] for word in report.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    model = make_model(text_encoder_dir=str(tmp_path), text_dim=32)
    batch = make_batch([2, 1], seed=4, config=model.config)
    model(batch)["loss"].backward()
    tokenizer_, encoder = model.tfp._frozen_encoder()
    assert all(p.grad is None for p in encoder.parameters())
    assert not any(name.startswith("tfp.") for name in model.state_dict())
    assert model.cha.text_proj["sentence"].weight.grad.abs().sum() > 0
    cached = len(model.tfp._cache)
    assert cached >= sum(len(report) for report in batch.text_units.sentence.texts)
    model(batch)
    assert len(model.tfp._cache) == cached
    with pytest.raises(RihaModelError, match="set text_dim to 32"):
        make_model(text_encoder_dir=str(tmp_path), text_dim=64)(batch)
