"""The RIHA model, top to bottom: inputs, visual pyramid, text pyramid, alignment, encoder-decoder, generation.

RIHA (report-image hierarchical alignment) is R2Gen's memory-driven transformer fed by a visual feature pyramid,
trained with a language-model loss plus an optimal-transport alignment (CHA) between visual units and report units at
three granularities. CHA only shapes training; generation uses the pyramid, the encoder and the decoder.

Where this differs from the reference code, it computes the same function faster:
- the pyramid averages each ResNet stage down to the token grid before its 1x1 projection (both are linear, so the
  order does not change the result, only the cost: the reference projects 56x56 layer1 maps to 2048 channels);
- the transport plans of a whole batch are solved at once (riha_model.ot), not in a Python loop over studies;
- decoding keeps a key/value cache and the relational-memory state, so a step costs one token, not the prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from riha_model.config import TEXT_LEVELS, RihaConfig
from riha_model.errors import RihaModelError
from riha_model.ot import sinkhorn_unbalanced_batch, uniform_marginals
from riha_model.text import Tokenizer, split_phrases, split_sentences

NUM_VIEW_KINDS = 3  # 0 frontal, 1 lateral, 2 other (riha_model.images)
PAD = BOS = EOS = 0  # R2Gen's convention: one id for padding, start and end


def _move(obj, device):
    """Copy of a dataclass with every tensor field moved to `device` (nested dataclasses too)."""
    values = {}
    for field in fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, Tensor) or is_dataclass(value):
            value = value.to(device)
        values[field.name] = value
    return type(obj)(**values)


# ----------------------------------------------------------------------------------------------- inputs

@dataclass
class TextLevel:
    """The units of one granularity for a batch of reports: where each sits in its report, which are real."""

    spans: Tensor  # LongTensor [B, N, 2]: first and one-past-last word position of each unit in TextUnits.ids
    mask: Tensor  # BoolTensor [B, N], True = a real unit
    texts: list[list[str]]  # per report, the unit strings (keys of the frozen-encoder cache)

    def to(self, device) -> TextLevel:
        return _move(self, device)


@dataclass
class TextUnits:
    """A batch of reports as word ids with their word (noun phrase), sentence and paragraph units: CHA's text side."""

    ids: Tensor  # LongTensor [B, L]: vocabulary ids of each report's words, cut to max_seq_len, 0-padded
    word: TextLevel
    sentence: TextLevel
    paragraph: TextLevel

    def to(self, device) -> TextUnits:
        return _move(self, device)


def _find(words: list[str], target: list[str], start: int, end: int) -> tuple[int, int] | None:
    """First (i, i + len(target)) with words[i:i + len(target)] == target inside words[start:end]."""
    for i in range(start, end - len(target) + 1):
        if words[i:i + len(target)] == target:
            return i, i + len(target)
    return None


def make_text_units(reports: Sequence[str], tokenizer: Tokenizer, config: RihaConfig) -> TextUnits:
    """Locate the sentences (riha_model.text.split_sentences) and noun phrases (split_phrases) of cleaned reports.

    Units are spans of the report's words, so one pass of the text encoder serves all three levels. A unit that
    lies beyond max_seq_len words, or whose words the splitter spelled differently from the report, is left out.
    """
    words_per_report, found = [], {level: [] for level in TEXT_LEVELS}
    for report in reports:
        words = report.split()[:config.max_seq_len]
        sentences, phrases, cursor = [], [], 0
        for sentence in split_sentences(report):
            sentence_span = _find(words, sentence.split(), cursor, len(words))
            if sentence_span is None:
                continue
            sentences.append((sentence_span, sentence))
            phrase_cursor = sentence_span[0]
            for phrase in split_phrases(sentence):
                phrase_span = _find(words, phrase.split(), phrase_cursor, sentence_span[1])
                if phrase_span is not None:
                    phrases.append((phrase_span, phrase))
                    phrase_cursor = phrase_span[1]
            cursor = sentence_span[1]
        words_per_report.append(words)
        found["paragraph"].append([((0, len(words)), " ".join(words))] if words else [])
        found["sentence"].append(sentences[:config.max_sentences])
        found["word"].append(phrases[:config.max_phrases])
    ids = torch.zeros(len(reports), max([1] + [len(words) for words in words_per_report]), dtype=torch.long)
    for i, words in enumerate(words_per_report):
        ids[i, :len(words)] = torch.tensor([tokenizer.token_id(word) for word in words], dtype=torch.long)
    return TextUnits(ids=ids, **{level: _text_level(found[level]) for level in TEXT_LEVELS})


def _text_level(units: list[list[tuple[tuple[int, int], str]]]) -> TextLevel:
    count = max([1] + [len(report) for report in units])
    spans = torch.zeros(len(units), count, 2, dtype=torch.long)
    mask = torch.zeros(len(units), count, dtype=torch.bool)
    for i, report in enumerate(units):
        for j, (span, _) in enumerate(report):
            spans[i, j], mask[i, j] = torch.tensor(span), True
    return TextLevel(spans=spans, mask=mask, texts=[[text for _, text in report] for report in units])


@dataclass
class Batch:
    """One training or evaluation batch (built by riha_model.data)."""

    images: Tensor  # FloatTensor [B, V, 3, H, W], normalised by riha_model.images.to_model_input
    view_mask: Tensor  # BoolTensor [B, V], True = a real view
    view_ids: Tensor  # LongTensor [B, V], 0 frontal, 1 lateral, 2 other
    tokens: Tensor  # LongTensor [B, T]: 0, word ids, 0 (R2Gen), then 0-padded
    token_mask: Tensor  # BoolTensor [B, T], True over BOS..EOS
    text_units: TextUnits | None = None  # the CHA targets; None skips CHA

    def to(self, device) -> Batch:
        return _move(self, device)


# ----------------------------------------------------------------------------------------------- visual pyramid

@dataclass
class VisualFeatures:
    tokens: Tensor  # [B, V*G*G, d_model]: fused levels plus view embedding, the encoder's input
    mask: Tensor  # [B, V*G*G] bool, False on padded views
    levels: tuple[Tensor, ...]  # four [B, V*G*G, d_model] maps, ResNet stage 1..4 after projection (for CHA)


def _load_backbone(config: RihaConfig) -> nn.Module:
    """A torchvision ResNet, with weights from a local file when the config names one; never downloads."""
    resnet = getattr(torchvision.models, config.backbone)(weights=None)
    if config.backbone_weights:
        try:
            if str(config.backbone_weights).endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(config.backbone_weights)
            else:
                state = torch.load(config.backbone_weights, map_location="cpu", weights_only=True)
            resnet.load_state_dict(state)
        except FileNotFoundError as exc:
            raise RihaModelError(f"Backbone weights file {config.backbone_weights} does not exist; "
                                 "set backbone_weights to a local torchvision state dict or to none.") from exc
        except (RuntimeError, OSError, ValueError) as exc:
            raise RihaModelError(f"Backbone weights file {config.backbone_weights} does not hold {config.backbone} "
                                 f"weights ({str(exc).splitlines()[0]}); use the torchvision file for that "
                                 "architecture.") from exc
    return resnet


def _resample(features: Tensor, size: int) -> Tensor:
    """Average down to size x size (or interpolate up, for small images whose late stages are smaller)."""
    if features.shape[-1] >= size:
        return F.adaptive_avg_pool2d(features, size)
    return F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False)


class VisualFeaturePyramid(nn.Module):
    """ResNet stages 1..4, each averaged to the grid and projected to d_model, fused by learned softmax weights."""

    def __init__(self, config: RihaConfig, pretrained: bool = True):
        super().__init__()
        resnet = _load_backbone(config) if pretrained else getattr(torchvision.models, config.backbone)(weights=None)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        expansion = 4 if config.backbone in ("resnet50", "resnet101", "resnet152") else 1
        widths = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.project = nn.ModuleList([nn.Conv2d(width, config.d_model, kernel_size=1) for width in widths])
        self.level_logits = nn.Parameter(torch.zeros(len(widths)))
        self.view_embed = nn.Embedding(NUM_VIEW_KINDS, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.grid_size = config.grid_size

    def backbone_parameters(self):
        """The ResNet's parameters (trained with the backbone learning rate)."""
        yield from self.stem.parameters()
        yield from self.stages.parameters()

    def level_maps(self, images: Tensor) -> list[Tensor]:
        """Per-stage [n, d_model, G, G] maps of n images: resample first, then project (the cheap order)."""
        x, maps = self.stem(images), []
        for stage, project in zip(self.stages, self.project):
            x = stage(x)
            maps.append(project(_resample(x, self.grid_size)))
        return maps

    def forward(self, images: Tensor, view_mask: Tensor, view_ids: Tensor) -> VisualFeatures:
        batch, views = view_mask.shape
        cells = self.grid_size * self.grid_size
        # Only real views go through the backbone: padding costs nothing and cannot touch batch-norm statistics.
        maps = self.level_maps(images[view_mask])
        levels = []
        for level_map in maps:
            padded = level_map.new_zeros(batch, views, cells, level_map.shape[1])
            padded[view_mask] = level_map.flatten(2).transpose(1, 2)
            levels.append(padded.flatten(1, 2))
        weights = torch.softmax(self.level_logits, dim=0)
        fused = sum(weight * level for weight, level in zip(weights, levels))
        views_embedded = self.view_embed(view_ids).repeat_interleave(cells, dim=1)
        mask = view_mask.repeat_interleave(cells, dim=1)
        return VisualFeatures(tokens=self.dropout(fused + views_embedded), mask=mask, levels=tuple(levels))


# ----------------------------------------------------------------------------------------------- text pyramid

class TextFeaturePyramid(nn.Module):
    """One vector per text unit: a small transformer trained with the model, or a frozen local transformers encoder.

    The trainable encoder reads each report once and averages its contextual word states over each unit's span, so
    all three levels cost one pass over the report (the reference encodes every unit on its own).
    The frozen encoder (the reference uses Bio_ClinicalBERT) is loaded on first use from `text_encoder_dir`, kept out
    of the state dict (it is not RIHA's to save) and its unit vectors are cached by unit text, since units repeat
    across epochs and across reports.
    """

    def __init__(self, config: RihaConfig, vocab_size: int):
        super().__init__()
        self.encoder_dir = config.text_encoder_dir
        self.out_dim = config.text_dim
        self._frozen: tuple | None = None  # (tokenizer, model), loaded lazily
        self._cache: dict[str, Tensor] = {}
        if self.encoder_dir is None:
            self.embed = nn.Embedding(vocab_size, config.text_dim, padding_idx=PAD)
            self.position = nn.Parameter(torch.randn(config.max_seq_len, config.text_dim) * 0.02)
            layer = nn.TransformerEncoderLayer(config.text_dim, config.text_heads, 2 * config.text_dim,
                                               config.dropout, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)

    def forward(self, units: TextUnits) -> dict[str, tuple[Tensor, Tensor]]:
        """level -> (vectors [B, N, text_dim], mask [B, N])."""
        if self.encoder_dir is not None:
            return {level: (self._encode_frozen(getattr(units, level)), getattr(units, level).mask)
                    for level in TEXT_LEVELS}
        padding = units.ids == PAD
        padding[:, 0] = False  # an empty report still has a row to attend to; no unit points at it
        x = self.embed(units.ids) + self.position[:units.ids.shape[1]]
        states = self.encoder(x, src_key_padding_mask=padding)
        positions = torch.arange(units.ids.shape[1], device=units.ids.device)
        vectors = {}
        for level in TEXT_LEVELS:
            spans = getattr(units, level).spans
            inside = ((positions >= spans[..., :1]) & (positions < spans[..., 1:])).to(states.dtype)  # [B, N, L]
            vectors[level] = (inside / inside.sum(-1, keepdim=True).clamp_min(1) @ states, getattr(units, level).mask)
        return vectors

    def _encode_frozen(self, level: TextLevel) -> Tensor:
        missing = sorted({text for report in level.texts for text in report} - self._cache.keys())
        if missing:
            self._cache.update(zip(missing, self._run_frozen(missing, level.mask.device)))
        out = torch.zeros(*level.mask.shape, self.out_dim, device=level.mask.device)
        for i, report in enumerate(level.texts):
            if report:
                out[i, :len(report)] = torch.stack([self._cache[text] for text in report]).to(out.device)
        return out

    @torch.no_grad()
    def _run_frozen(self, texts: list[str], device: torch.device, chunk: int = 64) -> list[Tensor]:
        tokenizer, model = self._frozen_encoder()
        model.to(device)
        vectors = []
        for start in range(0, len(texts), chunk):
            encoded = tokenizer(texts[start:start + chunk], padding=True, truncation=True, max_length=128,
                                return_tensors="pt").to(device)
            hidden = model(**encoded).last_hidden_state
            weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors.extend(((hidden * weights).sum(1) / weights.sum(1)).float())
        return vectors

    def _frozen_encoder(self) -> tuple:
        if self._frozen is None:
            from transformers import AutoModel, AutoTokenizer
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.encoder_dir, local_files_only=True)
                model = AutoModel.from_pretrained(self.encoder_dir, local_files_only=True).eval()
            except (OSError, ValueError) as exc:
                raise RihaModelError(f"No transformers text encoder can be loaded from {self.encoder_dir}; point "
                                     "text_encoder_dir at a local model folder or set it to none.") from exc
            if model.config.hidden_size != self.out_dim:
                raise RihaModelError(f"The text encoder in {self.encoder_dir} has hidden size "
                                     f"{model.config.hidden_size}; set text_dim to {model.config.hidden_size}.")
            model.requires_grad_(False)
            self._frozen = (tokenizer, model)
        return self._frozen


# ----------------------------------------------------------------------------------------------- alignment (CHA)

def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """[B, N, M] squared Euclidean distances between the rows of x [B, N, c] and y [B, M, c]."""
    return ((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)).clamp_min(0)


def unit_spread(units: Tensor) -> Tensor:
    """Root mean squared distance between pairs of units [n, c]: 0 when they all sit on one point."""
    if units.shape[0] < 2:
        return units.new_zeros(())
    n = units.shape[0]
    centred = units - units.mean(0)
    return torch.sqrt(2 * (centred * centred).sum(-1).mean() * n / (n - 1))


def collapse_penalty(units: Tensor) -> Tensor:
    """Mean over feature dimensions of max(0, 1 - std): 1 for units collapsed to one point, 0 once spread.

    Without it the OT cost has a trivial minimum, both projections mapping everything to one point (cost 0).
    """
    if units.shape[0] < 2:
        return units.new_zeros(())
    return F.relu(1 - torch.sqrt(units.var(0) + 1e-4)).mean()


class HierarchicalAlignment(nn.Module):
    """CHA: OT between projected visual units and text units at the word, sentence and paragraph level."""

    def __init__(self, config: RihaConfig, text_dim: int):
        super().__init__()
        self.config = config
        self.visual_proj = nn.ModuleDict({level: nn.Linear(config.d_model, config.cha_dim) for level in TEXT_LEVELS})
        self.text_proj = nn.ModuleDict({level: nn.Linear(text_dim, config.cha_dim) for level in TEXT_LEVELS})

    def forward(self, visual: VisualFeatures, text: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """cha_loss (weighted levels + anti-collapse term), each level's cost, and the spread of each side."""
        config, out = self.config, {}
        total, guard = visual.tokens.new_zeros(()), []
        for level in TEXT_LEVELS:
            x = self.visual_proj[level](visual.levels[config.level_visual_layers()[level] - 1])
            y = self.text_proj[level](text[level][0])
            x_mask, y_mask = visual.mask, text[level][1]
            out[f"cha_{level}"] = self.transport_cost(x, x_mask, y, y_mask)
            total = total + config.level_weights()[level] * out[f"cha_{level}"]
            for side, units in (("visual", x[x_mask]), ("text", y[y_mask])):
                guard.append(collapse_penalty(units))
                out[f"spread_{side}_{level}"] = unit_spread(units.detach())
        out["cha_guard"] = torch.stack(guard).mean()
        out["cha_loss"] = total + config.cha_spread_weight * out["cha_guard"]
        return out

    def transport_cost(self, x: Tensor, x_mask: Tensor, y: Tensor, y_mask: Tensor) -> Tensor:
        """Mean over studies with units on both sides of sum(cost * plan) / (N * M); the plan is a constant."""
        at_least_float32 = torch.promote_types(x.dtype, torch.float32)  # bf16 under autocast is too coarse for OT
        with torch.autocast(x.device.type, enabled=False):
            cost = squared_distances(x.to(at_least_float32), y.to(at_least_float32))
        valid = x_mask[:, :, None] & y_mask[:, None, :]
        with torch.no_grad():
            dtype = torch.float64 if cost.device.type in ("cpu", "cuda") else torch.float32
            detached = cost.detach().to(dtype).masked_fill(~valid, 0)
            scale = detached.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            plan = sinkhorn_unbalanced_batch(uniform_marginals(x_mask), uniform_marginals(y_mask), detached / scale,
                                             self.config.sinkhorn_reg, self.config.sinkhorn_reg_m,
                                             self.config.sinkhorn_max_iter, self.config.sinkhorn_tol)
        counts = x_mask.sum(1) * y_mask.sum(1)
        per_study = (cost * plan.to(cost.dtype)).sum((1, 2)) / counts.clamp_min(1)
        present = counts > 0
        return per_study[present].mean() if present.any() else cost.new_zeros(())


# ----------------------------------------------------------------------------------------------- R2Gen blocks

class LayerNorm(nn.Module):
    """R2Gen's layer norm: unbiased std, eps added to the std."""

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.beta


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate key/value projection, so keys and values can be cached."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.d_head = num_heads, d_model // num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(d_model, d_model) for _ in range(4))
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], -1, self.num_heads, self.d_head).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, heads, S, d_head] of the sequence x [B, S, d_model]."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
               bias: Tensor | None = None) -> Tensor:
        """query [B, T, d_model] over projected key/value; mask [B, 1 or T, S] (True = attend); bias [h, T, S]."""
        if mask is not None:
            mask = mask.unsqueeze(1)
        if bias is not None:
            bias = bias.unsqueeze(0).to(query.dtype)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        x = F.scaled_dot_product_attention(self._heads(self.query(query)), key, value, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(x.transpose(1, 2).flatten(2))

    def forward(self, query: Tensor, source: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attend(query, *self.project_kv(source), mask=mask)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2, self.dropout = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: RihaConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norms = nn.ModuleList([LayerNorm(config.d_model), LayerNorm(config.d_model)])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norms[0](x)
        x = x + self.dropout(self.self_attn(h, h, mask))
        return x + self.dropout(self.feed_forward(self.norms[1](x)))


class Encoder(nn.Module):
    """R2Gen's transformer encoder over the visual tokens (pre-norm, final norm)."""

    def __init__(self, config: RihaConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.norm = LayerNorm(config.d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, S, d_model]; mask [B, 1, S], True on real tokens."""
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class RelationalMemory(nn.Module):
    """R2Gen's relational memory: slots updated by attention over [slots; token], gated like an LSTM.

    The state after token t depends only on tokens <= t, so decoding carries it forward one step at a time.
    """

    def __init__(self, config: RihaConfig):
        super().__init__()
        self.num_slots, self.d_model = config.rm_num_slots, config.d_model
        self.attn = MultiHeadAttention(config.d_model, config.rm_num_heads, config.dropout)
        self.mlp = nn.Sequential(nn.Linear(self.d_model, self.d_model), nn.ReLU(),
                                 nn.Linear(self.d_model, self.d_model), nn.ReLU())
        self.W = nn.Linear(self.d_model, 2 * self.d_model)
        self.U = nn.Linear(self.d_model, 2 * self.d_model)

    def initial(self, batch_size: int, like: Tensor) -> Tensor:
        """[B, slots * d_model]: identity rows padded with zeros, as R2Gen starts every report."""
        memory = torch.eye(self.num_slots, self.d_model, dtype=like.dtype, device=like.device)
        return memory.flatten().expand(batch_size, -1).clone()

    def step(self, token: Tensor, memory: Tensor) -> Tensor:
        """Next state from one embedded token [B, d_model] and the state [B, slots * d_model]."""
        memory = memory.view(-1, self.num_slots, self.d_model)
        memory_and_token = torch.cat([memory, token.unsqueeze(1)], 1)
        next_memory = memory + self.attn(memory, memory_and_token)
        next_memory = next_memory + self.mlp(next_memory)
        gates = self.W(token.unsqueeze(1)) + self.U(torch.tanh(memory))
        input_gate, forget_gate = torch.sigmoid(gates).chunk(2, dim=2)
        next_memory = input_gate * torch.tanh(next_memory) + forget_gate * memory
        return next_memory.flatten(1)

    def forward(self, tokens: Tensor) -> Tensor:
        """States [B, T, slots * d_model] after each of the embedded tokens [B, T, d_model]."""
        memory, states = self.initial(tokens.shape[0], tokens), []
        for t in range(tokens.shape[1]):
            memory = self.step(tokens[:, t], memory)
            states.append(memory)
        return torch.stack(states, 1)


class MemoryConditionedLayerNorm(nn.Module):
    """MCLN: layer norm whose gain and bias are shifted by MLPs of the relational-memory state."""

    def __init__(self, d_model: int, num_slots: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d_model))
        self.beta = nn.Parameter(torch.zeros(d_model))
        self.mlp_gamma = nn.Sequential(nn.Linear(num_slots * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.mlp_beta = nn.Sequential(nn.Linear(num_slots * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        for mlp in (self.mlp_gamma, self.mlp_beta):
            for linear in (mlp[0], mlp[2]):
                nn.init.constant_(linear.bias, 0.1)
        self.eps = eps

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x [B, T, d]; memory [B, T, slots * d], the state after each token."""
        gamma = self.gamma + self.mlp_gamma(memory)
        beta = self.beta + self.mlp_beta(memory)
        return gamma * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + beta


class RelativePositionBias(nn.Module):
    """A learned bias per head and distance (query position - key position), clipped at max_distance."""

    def __init__(self, num_heads: int, max_distance: int):
        super().__init__()
        self.table = nn.Embedding(max_distance + 1, num_heads)
        nn.init.zeros_(self.table.weight)
        self.max_distance = max_distance

    def forward(self, query_positions: Tensor, key_length: int) -> Tensor:
        """[heads, Tq, key_length]."""
        keys = torch.arange(key_length, device=query_positions.device)
        distance = (query_positions[:, None] - keys[None, :]).clamp(0, self.max_distance)
        return self.table(distance).permute(2, 0, 1)


class SinusoidalPosition(nn.Module):
    """The reference's variant: sinusoidal absolute positions scaled by a learned factor."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
        self.register_buffer("table", table)  # saved, so a checkpoint loads into a model built on the meta device
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, start: int) -> Tensor:
        return x + self.scale * self.table[start:start + x.shape[1]]


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention over the visual tokens, feed-forward; each behind an MCLN."""

    def __init__(self, config: RihaConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout)
        self.src_attn = MultiHeadAttention(config.d_model, config.num_heads, config.dropout)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norms = nn.ModuleList([MemoryConditionedLayerNorm(config.d_model, config.rm_num_slots)
                                    for _ in range(3)])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, memory: Tensor, cross_kv: tuple[Tensor, Tensor], src_mask: Tensor,
                self_mask: Tensor | None, bias: Tensor | None, past: tuple[Tensor, Tensor] | None = None):
        """Returns (x, keys and values of self-attention so far); `past` holds those of earlier tokens."""
        h = self.norms[0](x, memory)
        key, value = self.self_attn.project_kv(h)
        if past is not None:
            key, value = torch.cat([past[0], key], 2), torch.cat([past[1], value], 2)
        x = x + self.dropout(self.self_attn.attend(h, key, value, self_mask, bias))
        x = x + self.dropout(self.src_attn.attend(self.norms[1](x, memory), *cross_kv, src_mask))
        return x + self.dropout(self.feed_forward(self.norms[2](x, memory))), (key, value)


@dataclass
class DecoderState:
    """What a cached decoding step needs from earlier steps; rows are (study, beam) pairs."""

    length: int  # tokens consumed so far
    memory: Tensor  # relational-memory state [R, slots * d_model]
    self_kv: list  # per layer (keys, values) [R, heads, length, d_head], or None before the first token
    cross_kv: list  # per layer (keys, values) over the visual tokens, computed once
    src_mask: Tensor  # [R, 1, S]

    def reorder(self, rows: Tensor) -> None:
        """Keep the rows of the surviving beams, in their new order. Beams never leave their study, so the visual
        keys and values (the same for every beam of a study) stay where they are."""
        self.memory = self.memory[rows]
        self.self_kv = [(key[rows], value[rows]) for key, value in self.self_kv]


class Decoder(nn.Module):
    """R2Gen's decoder: token embedding, relational memory, MCLN layers; relative positions in self-attention."""

    def __init__(self, config: RihaConfig, vocab_size: int):
        super().__init__()
        self.d_model = config.d_model
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.position = SinusoidalPosition(config.d_model, config.max_seq_len + 1) if config.rpe == "sinusoidal" \
            else None
        self.relative_bias = RelativePositionBias(config.num_heads, config.max_seq_len) if config.rpe == "bias" \
            else None
        self.dropout = nn.Dropout(config.dropout)
        self.memory = RelationalMemory(config)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.norm = LayerNorm(config.d_model)

    def embed_tokens(self, tokens: Tensor, start: int) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.d_model)
        if self.position is not None:
            x = self.position(x, start)
        return self.dropout(x)

    def cross_kv(self, encoded: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer, keys and values of cross-attention over the encoded visual tokens."""
        return [layer.src_attn.project_kv(encoded) for layer in self.layers]

    def _bias(self, query_positions: Tensor, key_length: int) -> Tensor | None:
        return None if self.relative_bias is None else self.relative_bias(query_positions, key_length)

    def forward(self, tokens: Tensor, cross_kv: list, src_mask: Tensor, self_mask: Tensor) -> Tensor:
        """Hidden states [B, T, d_model] of a whole token sequence (training; the uncached decoding path)."""
        x = self.embed_tokens(tokens, 0)
        memory = self.memory(x)
        bias = self._bias(torch.arange(tokens.shape[1], device=tokens.device), tokens.shape[1])
        for layer, kv in zip(self.layers, cross_kv):
            x, _ = layer(x, memory, kv, src_mask, self_mask, bias)
        return self.norm(x)

    def step(self, token: Tensor, state: DecoderState) -> Tensor:
        """Hidden state [R, d_model] of the next token [R], reading and extending the cache in `state`."""
        x = self.embed_tokens(token[:, None], state.length)
        state.memory = self.memory.step(x[:, 0], state.memory)
        memory = state.memory[:, None]
        bias = self._bias(torch.tensor([state.length], device=token.device), state.length + 1)
        for i, layer in enumerate(self.layers):
            x, state.self_kv[i] = layer(x, memory, state.cross_kv[i], state.src_mask, None, bias, state.self_kv[i])
        state.length += 1
        return self.norm(x)[:, 0]


def causal_mask(length: int, device=None) -> Tensor:
    """[1, T, T] True where a query may see a key (itself and earlier positions)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().unsqueeze(0)


def training_self_mask(inputs: Tensor) -> Tensor:
    """R2Gen's decoder mask: causal, and padding (id 0) hidden except the leading start token."""
    keys = inputs != PAD
    keys[:, 0] = True
    return keys[:, None, :] & causal_mask(inputs.shape[1], inputs.device)


# ----------------------------------------------------------------------------------------------- the model

class RIHA(nn.Module):
    """Visual pyramid -> encoder -> memory-driven decoder, with CHA between the pyramids during training."""

    def __init__(self, config: RihaConfig, vocab_size: int, pretrained: bool = True):
        """`pretrained`: load `config.backbone_weights` (a checkpoint load passes False: its weights replace them)."""
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.vfp = VisualFeaturePyramid(config, pretrained=pretrained)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, vocab_size)
        self.logit = nn.Linear(config.d_model, vocab_size)
        self.tfp = TextFeaturePyramid(config, vocab_size)
        self.cha = HierarchicalAlignment(config, self.tfp.out_dim)
        for module in (self.encoder, self.decoder):  # R2Gen initialises its transformer this way
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        if self.decoder.relative_bias is not None:  # relative positions start neutral
            nn.init.zeros_(self.decoder.relative_bias.table.weight)

    def backbone_parameters(self):
        """The ResNet's parameters (R2Gen trains them with a smaller learning rate)."""
        return self.vfp.backbone_parameters()

    def head_parameters(self):
        """Every trainable parameter outside the ResNet."""
        backbone = {id(parameter) for parameter in self.backbone_parameters()}
        return (parameter for parameter in self.parameters() if id(parameter) not in backbone)

    def encode(self, images: Tensor, view_mask: Tensor, view_ids: Tensor) -> tuple[Tensor, Tensor, VisualFeatures]:
        """Encoded visual tokens [B, S, d_model], their mask [B, 1, S], and the pyramid's features."""
        if not view_mask.any(1).all():
            raise RihaModelError("A study in the batch has no image; every study needs at least one view.")
        visual = self.vfp(images, view_mask, view_ids)
        src_mask = visual.mask.unsqueeze(1)
        return self.encoder(visual.tokens, src_mask), src_mask, visual

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Losses: loss = lm_loss + cha_weight * cha_loss, plus each CHA level, the guard and the unit spreads."""
        encoded, src_mask, visual = self.encode(batch.images, batch.view_mask, batch.view_ids)
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        hidden = self.decoder(inputs, self.decoder.cross_kv(encoded), src_mask, training_self_mask(inputs))
        token_loss = F.cross_entropy(self.logit(hidden).transpose(1, 2), targets, reduction="none")
        target_mask = batch.token_mask[:, 1:].to(token_loss.dtype)
        out = {"lm_loss": (token_loss * target_mask).sum() / target_mask.sum().clamp_min(1)}
        if batch.text_units is None:
            out["cha_loss"] = out["lm_loss"].new_zeros(())
        else:
            out.update(self.cha(visual, self.tfp(batch.text_units)))
        out["loss"] = out["lm_loss"] + self.config.cha_weight * out["cha_loss"]
        return out

    @torch.no_grad()
    def generate(self, images: Tensor, view_mask: Tensor, view_ids: Tensor, beam_size: int | None = None,
                 max_len: int | None = None, block_trigrams: bool | None = None, use_cache: bool = True
                 ) -> list[list[int]]:
        """Token ids (no start or end token) of the best beam per study; defaults come from the config.

        `use_cache=False` re-decodes the whole prefix at every step, as the reference does (kept for tests and the
        benchmark; the tokens are the same).
        """
        config = self.config
        beam_size = config.beam_size if beam_size is None else beam_size
        max_len = config.max_seq_len if max_len is None else max_len
        block_trigrams = config.block_trigrams if block_trigrams is None else block_trigrams
        was_training = self.training
        self.eval()
        try:
            encoded, src_mask, _ = self.encode(images, view_mask, view_ids)
            rows = torch.arange(encoded.shape[0], device=encoded.device).repeat_interleave(beam_size)
            decoding = (CachedDecoding if use_cache else PrefixDecoding)(self, encoded[rows], src_mask[rows])
            return beam_search(decoding, encoded.shape[0], beam_size, max_len, block_trigrams, encoded.device)
        finally:
            self.train(was_training)


# ----------------------------------------------------------------------------------------------- generation

class CachedDecoding:
    """Next-token log-probabilities one token at a time: self-attention keys/values and memory state are carried."""

    def __init__(self, model: RIHA, encoded: Tensor, src_mask: Tensor):
        self.model = model
        decoder = model.decoder
        self.state = DecoderState(length=0, memory=decoder.memory.initial(encoded.shape[0], encoded),
                                  self_kv=[None] * len(decoder.layers), cross_kv=decoder.cross_kv(encoded),
                                  src_mask=src_mask)

    def logprobs(self, tokens: Tensor) -> Tensor:
        return F.log_softmax(self.model.logit(self.model.decoder.step(tokens, self.state)), dim=-1)

    def reorder(self, rows: Tensor) -> None:
        self.state.reorder(rows)


class PrefixDecoding:
    """Next-token log-probabilities by decoding the whole prefix again (the reference's way; no cache)."""

    def __init__(self, model: RIHA, encoded: Tensor, src_mask: Tensor):
        self.model, self.encoded, self.src_mask = model, encoded, src_mask
        self.prefix = torch.zeros(encoded.shape[0], 0, dtype=torch.long, device=encoded.device)

    def logprobs(self, tokens: Tensor) -> Tensor:
        self.prefix = torch.cat([self.prefix, tokens[:, None]], 1)
        decoder = self.model.decoder
        hidden = decoder(self.prefix, decoder.cross_kv(self.encoded), self.src_mask,
                         causal_mask(self.prefix.shape[1], self.prefix.device))
        return F.log_softmax(self.model.logit(hidden[:, -1]), dim=-1)

    def reorder(self, rows: Tensor) -> None:
        self.prefix = self.prefix[rows]


def banned_trigram_tokens(sequences: Tensor, vocab_size: int) -> Tensor:
    """[R, V] True for each token that would repeat a trigram already in its row of `sequences` [R, t]."""
    banned = torch.zeros(sequences.shape[0], vocab_size, dtype=torch.bool, device=sequences.device)
    length = sequences.shape[1]
    if length < 3:
        return banned
    same_pair = (sequences[:, :length - 2] == sequences[:, -2:-1]) & (sequences[:, 1:length - 1] == sequences[:, -1:])
    hits = torch.zeros(banned.shape, device=sequences.device).scatter_add_(1, sequences[:, 2:], same_pair.float())
    return hits > 0


def beam_search(decoding, batch_size: int, beam_size: int, max_len: int, block_trigrams: bool,
                device: torch.device) -> list[list[int]]:
    """Batched beam search with R2Gen's rules: at each step the best `beam_size` continuations of the live beams
    are kept; one that ends (id 0) is set aside as a finished report; after `max_len` steps the live beams finish
    too; the finished report with the highest summed log-probability wins (no length penalty). Trigram blocking
    forbids a token that would repeat a trigram of its beam. Beam size 1 is greedy decoding.

    Written here rather than with transformers' `generate`: that needs the model wrapped as a PreTrainedModel, the
    relational-memory state carried in a Cache subclass, its beam rules (length normalisation, early-stopping
    heuristics) differ from R2Gen's, and its n-gram blocking rebuilds every beam's n-grams in Python at each step;
    here blocking is one tensor operation. The search stops as soon as no live beam can beat a finished one (scores
    only fall), which changes nothing in the result.
    """
    rows_total = batch_size * beam_size
    scores = torch.full((batch_size, beam_size), float("-inf"), dtype=torch.float64)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first at step 0
    sequences = torch.zeros(rows_total, 0, dtype=torch.long)
    tokens = torch.full((rows_total,), BOS, dtype=torch.long, device=device)
    best_score = torch.full((batch_size,), float("-inf"), dtype=torch.float64)
    best: list[list[int]] = [[] for _ in range(batch_size)]
    for step in range(max_len):
        logprobs = decoding.logprobs(tokens).double().cpu()
        vocab_size = logprobs.shape[-1]
        if block_trigrams:
            logprobs = logprobs.masked_fill(banned_trigram_tokens(sequences, vocab_size), float("-inf"))
        candidates = (scores.unsqueeze(-1) + logprobs.view(batch_size, beam_size, vocab_size)).view(batch_size, -1)
        top_scores, top_index = candidates.topk(beam_size, dim=1)
        words = top_index % vocab_size
        rows = (top_index // vocab_size + torch.arange(batch_size).unsqueeze(1) * beam_size).view(-1)
        sequences = torch.cat([sequences[rows], words.view(-1, 1)], 1)
        ends = top_scores > float("-inf")
        if step < max_len - 1:
            ends &= words == EOS
        for b, k in ends.nonzero().tolist():
            if top_scores[b, k] > best_score[b]:
                best_score[b] = top_scores[b, k]
                row = sequences[b * beam_size + k]
                best[b] = (row[:-1] if words[b, k] == EOS else row).tolist()
        scores = top_scores.masked_fill(ends, float("-inf"))
        if (best_score >= scores.max(1).values).all():
            break
        tokens = words.view(-1).to(tokens.device)
        decoding.reorder(rows.to(tokens.device))
    return best

