"""Decoding: the key/value cache changes no token, beam 1 is greedy, trigrams are blocked, beams end on id 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from riha_model.model import EOS, RIHA, banned_trigram_tokens, causal_mask
from tests.model.test_model_forward import make_batch, make_model


def float64_model(rpe: str = "bias", end_bias: float = 0.0) -> RIHA:
    """A random tiny model in float64, so that cached and uncached logits agree to ~1e-15 and no near-tie flips.

    end_bias raises the end token's logit so that beams end at different steps.
    """
    model = make_model(seed=11, rpe=rpe).double().eval()
    with torch.no_grad():
        model.logit.bias[EOS] += end_bias
    return model


def generate(model: RIHA, batch, **options) -> list[list[int]]:
    return model.generate(batch.images.double(), batch.view_mask, batch.view_ids, **options)


@pytest.mark.parametrize("rpe, beam_size, end_bias", [("bias", 3, 0.0), ("bias", 3, 1.0), ("bias", 1, 1.0),
                                                     ("sinusoidal", 3, 1.0), ("sinusoidal", 1, 0.0)])
def test_cached_decoding_gives_exactly_the_tokens_of_uncached_decoding(rpe, beam_size, end_bias):
    model = float64_model(rpe, end_bias)
    batch = make_batch([2, 1, 3], seed=7)
    cached = generate(model, batch, beam_size=beam_size, max_len=12)
    uncached = generate(model, batch, beam_size=beam_size, max_len=12, use_cache=False)
    assert cached == uncached
    lengths = [len(ids) for ids in cached]
    assert all(length <= 12 for length in lengths)
    if end_bias:
        assert min(lengths) < 12  # some reports ended on id 0, which is not part of the output
    assert all(EOS not in ids for ids in cached)


def greedy_by_hand(model: RIHA, batch, max_len: int) -> list[list[int]]:
    """Greedy decoding written plainly: decode the prefix, take the arg max, stop at id 0."""
    results = []
    with torch.no_grad():
        encoded, src_mask, _ = model.encode(batch.images.double(), batch.view_mask, batch.view_ids)
        for i in range(encoded.shape[0]):
            prefix = [0]
            for _ in range(max_len):
                tokens = torch.tensor([prefix])
                hidden = model.decoder(tokens, model.decoder.cross_kv(encoded[i:i + 1]), src_mask[i:i + 1],
                                       causal_mask(len(prefix)))
                word = int(F.log_softmax(model.logit(hidden[0, -1]), -1).argmax())
                if word == EOS:
                    break
                prefix.append(word)
            results.append(prefix[1:])
    return results


@pytest.mark.parametrize("end_bias", [0.0, 1.0])
def test_beam_size_one_is_greedy_decoding(end_bias):
    model = float64_model(end_bias=end_bias)
    batch = make_batch([1, 2], seed=8)
    assert generate(model, batch, beam_size=1, max_len=12, block_trigrams=False) == greedy_by_hand(model, batch, 12)


def test_beam_search_scores_at_least_as_well_as_greedy():
    model = float64_model(end_bias=0.5)
    batch = make_batch([2, 2, 1, 3], seed=9)

    def log_probability(study: int, ids: list[int]) -> float:
        tokens = torch.tensor([[0, *ids]])
        with torch.no_grad():
            encoded, src_mask, _ = model.encode(batch.images[study:study + 1].double(),
                                                batch.view_mask[study:study + 1], batch.view_ids[study:study + 1])
            hidden = model.decoder(tokens, model.decoder.cross_kv(encoded), src_mask, causal_mask(tokens.shape[1]))
            logprobs = F.log_softmax(model.logit(hidden[0]), -1)
        targets = [*ids, EOS] if len(ids) < 10 else ids
        return sum(logprobs[t, target].item() for t, target in enumerate(targets))

    greedy = generate(model, batch, beam_size=1, max_len=10, block_trigrams=False)
    beam = generate(model, batch, beam_size=3, max_len=10, block_trigrams=False)
    for study in range(4):
        assert log_probability(study, beam[study]) >= log_probability(study, greedy[study]) - 1e-9


def test_no_trigram_repeats_when_blocked():
    model = float64_model()
    batch = make_batch([1, 2], seed=10)
    for ids in generate(model, batch, beam_size=3, max_len=30, block_trigrams=True):
        trigrams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        assert len(trigrams) == len(set(trigrams))


def test_banned_trigram_tokens():
    sequences = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    sequences[1, 2] = 8
    banned = banned_trigram_tokens(sequences, vocab_size=10)
    assert banned[0].nonzero().flatten().tolist() == [7]
    assert banned[1].nonzero().flatten().tolist() == [8]
    assert not banned[2].any()
    assert not banned_trigram_tokens(sequences[:, :2], 10).any()


def test_generate_restores_training_mode_and_defaults_to_the_config():
    model = make_model(max_seq_len=8, beam_size=2)
    model.train()
    batch = make_batch([1, 2], seed=12, config=model.config)
    ids = model.generate(batch.images, batch.view_mask, batch.view_ids)
    assert model.training
    assert [len(report) for report in ids] == [8, 8]  # a random model rarely ends: the config's length
    assert ids == model.generate(batch.images, batch.view_mask, batch.view_ids, beam_size=2, max_len=8)
