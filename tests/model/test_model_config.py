"""The model configuration: the paper's dimensions, round trips, and clear refusals."""
from __future__ import annotations

import pytest

from riha_model.config import RihaConfig
from riha_model.errors import RihaModelError


def test_the_paper_preset_has_the_reference_dimensions():
    config = RihaConfig.preset("paper")
    assert (config.backbone, config.image_size, config.grid_size) == ("resnet101", 224, 7)
    assert (config.d_model, config.num_heads, config.d_ff) == (512, 8, 512)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.rm_num_slots) == (3, 3, 3)
    assert (config.max_seq_len, config.beam_size, config.dropout) == (60, 3, 0.1)
    assert config.cha_weight == 0.5
    assert config.level_weights() == {"word": 0.3, "sentence": 0.2, "paragraph": 0.5}
    assert config.level_visual_layers() == {"word": 1, "sentence": 2, "paragraph": 4}
    assert (config.sinkhorn_reg, config.sinkhorn_reg_m) == (0.1, 0.5)
    assert config.backbone_weights is None and config.text_encoder_dir is None


def test_presets_take_overrides_and_round_trip_through_a_dict():
    config = RihaConfig.preset("tiny", rpe="sinusoidal", backbone_weights="/site/resnet18.pth")
    assert config.backbone == "resnet18" and config.rpe == "sinusoidal"
    assert RihaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("build, message", [
    (lambda: RihaConfig.preset("huge"), "Unknown model preset 'huge'"),
    (lambda: RihaConfig(rpe="rotary"), "rpe 'rotary' is not known"),
    (lambda: RihaConfig(backbone="vit_b_16"), "Backbone 'vit_b_16' is not supported"),
    (lambda: RihaConfig(word_visual_layer=5), "word_visual_layer must name a ResNet stage"),
    (lambda: RihaConfig(d_model=500), "d_model 500 is not divisible by the head count 8"),
    (lambda: RihaConfig.from_dict({**RihaConfig().to_dict(), "extra": 1}), "unknown keys: extra; missing keys: none"),
    (lambda: RihaConfig.from_dict([1, 2]), "not a mapping"),
])
def test_bad_settings_are_refused_with_a_clear_message(build, message):
    with pytest.raises(RihaModelError, match=message):
        build()
