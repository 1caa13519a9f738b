"""Every size and switch of the RIHA model in one dataclass, with the paper's dimensions and a CPU-sized preset.

The checkpoint stores `RihaConfig.to_dict()`; `RihaConfig.from_dict` refuses unknown or missing keys so that a
checkpoint from another model layout fails with a clear message instead of loading half its weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from riha_model.errors import RihaModelError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RPE_VARIANTS = ("bias", "sinusoidal")
TEXT_LEVELS = ("word", "sentence", "paragraph")


@dataclass
class RihaConfig:
    """Sizes of the visual pyramid, text pyramid, alignment, encoder-decoder and decoding."""

    # Visual feature pyramid: torchvision ResNet, taps after layer1..layer4, fused on a grid x grid map per view.
    backbone: str = "resnet101"
    backbone_weights: str | None = None  # local torchvision state dict (.pth / .safetensors); None = random init
    image_size: int = 224
    grid_size: int = 7

    # Text feature pyramid: a small encoder trained with the model, or a frozen transformers encoder from a folder.
    text_encoder_dir: str | None = None
    text_dim: int = 512  # width of the unit vectors (the hidden size of the encoder in text_encoder_dir, if set)
    text_layers: int = 1
    text_heads: int = 8
    max_sentences: int = 12  # sentence units kept per report
    max_phrases: int = 32  # word (noun phrase) units kept per report

    # Cross-modal hierarchical alignment: entropic unbalanced OT between visual and text units at three levels.
    cha_dim: int = 512
    cha_weight: float = 0.5
    cha_word_weight: float = 0.3
    cha_sentence_weight: float = 0.2
    cha_paragraph_weight: float = 0.5
    word_visual_layer: int = 1  # ResNet stage whose units align with words (phrases)
    sentence_visual_layer: int = 2
    paragraph_visual_layer: int = 4
    sinkhorn_reg: float = 0.1
    sinkhorn_reg_m: float = 0.5
    sinkhorn_max_iter: int = 1000
    sinkhorn_tol: float = 1e-6
    cha_spread_weight: float = 1.0  # weight of the anti-collapse term; 0 gives the reference's loss

    # R2Gen encoder-decoder with relational memory and memory-conditioned layer norm.
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 512
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dropout: float = 0.1
    rm_num_slots: int = 3
    rm_num_heads: int = 8
    rpe: str = "bias"  # "bias": relative position bias in decoder self-attention; "sinusoidal": the reference's

    # Decoding.
    max_seq_len: int = 60
    beam_size: int = 3
    block_trigrams: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise RihaModelError(f"Backbone {self.backbone!r} is not supported; use one of {', '.join(BACKBONES)}.")
        if self.rpe not in RPE_VARIANTS:
            raise RihaModelError(f"rpe {self.rpe!r} is not known; use one of {', '.join(RPE_VARIANTS)}.")
        for name in ("word_visual_layer", "sentence_visual_layer", "paragraph_visual_layer"):
            if getattr(self, name) not in (1, 2, 3, 4):
                raise RihaModelError(f"{name} must name a ResNet stage 1..4, not {getattr(self, name)!r}.")
        for name, heads in (("d_model", self.num_heads), ("d_model", self.rm_num_heads), ("text_dim", self.text_heads)):
            if getattr(self, name) % heads:
                raise RihaModelError(f"{name} {getattr(self, name)} is not divisible by the head count {heads}.")
        if self.max_seq_len < 2 or self.beam_size < 1 or self.grid_size < 1:
            raise RihaModelError("max_seq_len must be at least 2, beam_size and grid_size at least 1.")

    @classmethod
    def preset(cls, name: str, **overrides) -> RihaConfig:
        """`paper`: the reference's dimensions; `tiny`: trains on a 2-core CPU in minutes (tests, demos)."""
        if name not in PRESETS:
            raise RihaModelError(f"Unknown model preset {name!r}; use one of {', '.join(PRESETS)}.")
        return cls.from_dict({**dataclasses.asdict(PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RihaConfig:
        """Build from a stored dict; unknown or missing keys are an error naming them."""
        if not isinstance(data, dict):
            raise RihaModelError("The model configuration is not a mapping; the checkpoint is damaged.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown or missing:
            raise RihaModelError(f"The model configuration does not match this version of riha_model (unknown keys: "
                                 f"{', '.join(unknown) or 'none'}; missing keys: {', '.join(missing) or 'none'}).")
        return cls(**data)

    def level_weights(self) -> dict[str, float]:
        """CHA weight of each text level (word, sentence, paragraph)."""
        return {"word": self.cha_word_weight, "sentence": self.cha_sentence_weight,
                "paragraph": self.cha_paragraph_weight}

    def level_visual_layers(self) -> dict[str, int]:
        """ResNet stage (1..4) aligned with each text level."""
        return {"word": self.word_visual_layer, "sentence": self.sentence_visual_layer,
                "paragraph": self.paragraph_visual_layer}


PRESETS = {
    "paper": RihaConfig(),
    "tiny": RihaConfig(backbone="resnet18", image_size=128, grid_size=4, text_dim=64, text_heads=4,
                       max_sentences=8, max_phrases=16, cha_dim=64, d_model=128, num_heads=4,
                       d_ff=256, num_encoder_layers=1, num_decoder_layers=2, rm_num_heads=4),
}
