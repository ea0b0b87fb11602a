"""Temporal LoRA: starts as the identity, trains only the adapters, learns, comes off cleanly; bad input."""

import pytest
import torch
from torch import nn

from fastdiff.config import DiffusionConfig
from fastdiff.diffusion import Schedule
from fastdiff.lora import FastLearner, LoRALinear, add_temporal_lora, lora_layers, remove_temporal_lora
from fastdiff.models.dit import VideoDiT

SCHEDULE = Schedule.make("linear", 1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(depth=2):
    torch.manual_seed(0)
    model = VideoDiT(3, 4, 4, 6, width=64, depth=depth, heads=2).eval()
    for p in model.parameters():  # leave adaLN-zero so that the output depends on the temporal layers
        nn.init.normal_(p, std=0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 3, 4, 4, generator=g), torch.randint(0, 1000, (2, 6), generator=g).float(), \
        torch.zeros(2, 6, dtype=torch.bool)


def test_adapters_sit_on_the_temporal_projections_and_start_as_identity():
    model = _model()
    x, t, obs = _inputs()
    before = model(x, t, obs)
    params = add_temporal_lora(model, rank=32)
    layers = lora_layers(model)
    assert len(layers) == 2 * 2  # qkv and proj of each block's temporal attention
    assert all(block.temporal.qkv in layers and block.temporal.proj in layers for block in model.blocks)
    assert not any(isinstance(block.spatial.qkv, LoRALinear) for block in model.blocks)
    assert all(layer.lora_a.shape[0] == 32 for layer in layers)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in params) == 2 * (32 * 64 + 192 * 32) + 2 * (32 * 64 + 64 * 32)
    torch.testing.assert_close(model(x, t, obs), before, atol=0, rtol=0)


def test_remove_restores_the_base_model_exactly():
    model = _model()
    x, t, obs = _inputs()
    before = model(x, t, obs)
    params = add_temporal_lora(model, rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert (model(x, t, obs) - before).abs().max() > 1e-4  # the adapters do act
    remove_temporal_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(model(x, t, obs), before, atol=0, rtol=0)


def test_bad_input_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="rank"):
        add_temporal_lora(model, rank=0)
    add_temporal_lora(model, rank=2)
    with pytest.raises(ValueError, match="already"):
        add_temporal_lora(model, rank=2)
    with pytest.raises(ValueError, match="no temporal attention"):
        add_temporal_lora(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="steps"):
        FastLearner(_model(), SCHEDULE, DiffusionConfig(), window=6, steps=0)


def test_fast_learner_updates_only_the_adapters_and_fits_the_rollout():
    model = _model(depth=1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    learner = FastLearner(model, SCHEDULE, DiffusionConfig(), window=6, rank=8, lr=3e-3, steps=1,
                          generator=torch.Generator().manual_seed(0))
    chunk_a, chunk_b = torch.randn(1, 3, 3, 4, 4), torch.randn(1, 3, 3, 4, 4)
    learner.observe(chunk_a)
    assert learner.updates == 0  # nothing to pair the first chunk with yet
    learner.observe(chunk_b)
    assert learner.updates == 1 and torch.equal(learner.previous, chunk_b)
    # base weights are bit-identical; only the adapters moved
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base[key.replace(".base.", ".")]), key
    assert any(layer.lora_b.abs().sum() > 0 for layer in lora_layers(model))

    def loss_on_pair():  # fixed noise and level: the loss the adapters are minimising
        clip = torch.cat([chunk_a, chunk_b], dim=1)
        t = torch.full((1, 6), 300)
        noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(5))
        a, s = SCHEDULE.alpha[300], SCHEDULE.sigma[300]
        with torch.no_grad():
            return float((model(a * clip + s * noise, t.float(), torch.zeros(1, 6, dtype=torch.bool)) - noise)
                         .pow(2).mean())

    before = loss_on_pair()
    for _ in range(40):  # keep pairing the same two chunks
        learner.previous = chunk_a
        learner.observe(chunk_b)
    assert loss_on_pair() < 0.8 * before
