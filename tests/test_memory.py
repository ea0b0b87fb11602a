"""The memory estimate printed before training (fastdiff/memory.py): exact parameter count, the activation
term against a measured step, every GPU preset inside its budget on the largest stream; on a GPU the
budget enforced with torch.cuda.set_per_process_memory_fraction."""

import pytest
import torch

from fastdiff.config import PRESET_BUDGET_GIB, build_config
from fastdiff.memory import TensorMemoryTracker, dit_parameters, estimate, fits
from fastdiff.models.dit import VideoDiT, count_parameters

STREAMS = {"balls": ((32, 32), 10), "maze": ((64, 64), 20)}


@pytest.mark.parametrize("overlap,local_mix,kernel", [(False, False, 3), (True, False, 3), (False, True, 3),
                                                      (False, True, 5)])
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("patch,channels,hw,window", [(1, 4, 8, 10), (4, 3, 32, 10), (2, 4, 16, 20)])
def test_parameter_count_is_exact(patch, channels, hw, window, pos_embed, overlap, local_mix, kernel):
    cfg = build_config("tiny", None, {"model.patch": str(patch), "model.pos_embed": pos_embed,
                                      "model.overlap": str(overlap).lower(), "model.local_mix": str(local_mix).lower(),
                                      "model.local_mix_kernel": str(kernel)})
    m = cfg.model
    model = VideoDiT(channels, hw, hw, window, width=m.width, depth=m.depth, heads=m.heads, patch=patch,
                     pos_embed=pos_embed, overlap=overlap, local_mix=local_mix, local_mix_kernel=kernel)
    assert dit_parameters(cfg, channels, (hw // patch) ** 2, window) == count_parameters(model)


@pytest.mark.parametrize("checkpointing,local_mix", [(False, False), (True, False), (False, True)])
def test_activation_estimate_matches_a_measured_step(checkpointing, local_mix):
    """Peak bytes of the tensors a training step creates (forward and backward) vs the activation estimate."""
    cfg = build_config("tiny", None, {"model.width": "64", "model.depth": "2", "model.heads": "2",
                                      "replay.replayed": "3", "run.precision": "fp32",
                                      "model.checkpoint_activations": str(checkpointing).lower(),
                                      "model.local_mix": str(local_mix).lower()})
    m, batch, window = cfg.model, 4, 10
    model = VideoDiT(4, 8, 8, window, width=m.width, depth=m.depth, heads=m.heads,
                     checkpoint_activations=checkpointing, local_mix=local_mix).train()
    x = torch.randn(batch, window, 4, 8, 8)
    t = torch.randint(0, 1000, (batch, window)).float()
    observed = torch.rand(batch, window) < 0.3
    with TensorMemoryTracker() as tracker:
        model(x, t, observed).square().mean().backward()
    predicted = estimate(cfg, (32, 32), window, "cpu")["activations"] * 2**20
    assert 0.8 < predicted / tracker.peak < 1.25, (predicted, tracker.peak)


@pytest.mark.parametrize("preset", sorted(PRESET_BUDGET_GIB))
def test_gpu_presets_fit_their_budget_on_every_stream(preset):
    for stream, (hw, window) in STREAMS.items():
        cfg = build_config(preset, None, {})
        est = estimate(cfg, hw, window, "cuda")
        assert fits(est, PRESET_BUDGET_GIB[preset]), (preset, stream, est)
    # and the presets grow with the budget
    sizes = [estimate(build_config(p, None, {}), (64, 64), 20, "cuda")["parameters_M"]
             for p in ("gpu-8gb", "gpu-12gb", "gpu-24gb", "h100")]
    assert sizes == sorted(sizes)


def test_the_trainer_prints_the_estimate_before_training(tmp_path):
    from test_train import _cfg

    from fastdiff.train import OnlineTrainer

    lines = []
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=12), tmp_path / "run", log=lines.append)
    trainer.train()
    printed = [line for line in lines if line.startswith("memory estimate:")]
    assert printed and "MiB" in printed[0] and "parameters" in printed[0]
    assert "activations" in printed[0] and "optimizer state" in printed[0]


@pytest.mark.gpu
@pytest.mark.parametrize("preset", sorted(PRESET_BUDGET_GIB))
def test_gpu_preset_holds_its_budget(tmp_path, preset):
    from fastdiff.train import OnlineTrainer

    total = torch.cuda.get_device_properties(0).total_memory
    budget = PRESET_BUDGET_GIB[preset] * 2**30
    if budget > total:
        pytest.skip(f"{preset} needs {budget / 2**30:.0f} GiB, this GPU has {total / 2**30:.0f}")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(budget / total)
    torch.cuda.reset_peak_memory_stats()
    try:
        cfg = build_config(preset, None, {"run.stream": "maze", "run.frames": "60", "run.stream_frames": "1000000",
                                          "run.out": str(tmp_path), "run.progress": "false", "run.sample_every": "0",
                                          "autoencoder.fit_steps": "20", "run.checkpoint_every": "1000"})
        OnlineTrainer(cfg, tmp_path / preset, log=lambda *_: None).train()
        peak = torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert peak <= budget
