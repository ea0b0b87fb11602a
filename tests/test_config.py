import pytest

from fastdiff.config import PRESETS, Config, ConfigError, build_config, parse_overrides, validate


def test_presets_build_and_validate():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.preset == name
        validate(cfg)


def test_precedence_preset_then_toml_then_overrides(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text('[optim]\nlr = 3e-4\n[run]\nframes = 123\n')
    cfg = build_config("tiny", str(toml), {"run.frames": "77"})
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.run.frames == 77
    assert cfg.model.width == PRESETS["tiny"]["model"]["width"]


def test_overrides_coerce_types():
    cfg = build_config("tiny", None, parse_overrides(["run.compile=true", "optim.lr=1e-3", "run.frames=2e3"]))
    assert cfg.run.compile is True and cfg.optim.lr == 1e-3 and cfg.run.frames == 2000


@pytest.mark.parametrize(
    "override, field",
    [
        ({"model.width": "-8"}, "model.width"),
        ({"model.heads": "5"}, "model.width"),  # 96 not divisible by 5
        ({"model.heads": "1"}, "model.heads"),  # head dim 96 unsupported
        ({"replay.fraction": "2.0"}, "replay.fraction"),
        ({"replay.strategy": "magic"}, "replay.strategy"),
        ({"optim.lr": "abc"}, "optim.lr"),
        ({"optim.nosuch": "1"}, "optim.nosuch"),
        ({"nosection.x": "1"}, "nosection"),
        ({"run.frames": "-1"}, "run.frames"),
        ({"diffusion.sample_steps": "5000"}, "diffusion.sample_steps"),
        ({"run.compile": "maybe"}, "run.compile"),
        ({"diffusion.rollout_observed": "-1"}, "diffusion.rollout_observed"),
        ({"model.local_mix_kernel": "4"}, "model.local_mix_kernel"),
        ({"model.local_mix_kernel": "-1"}, "model.local_mix_kernel"),
        ({"diffusion.rollout_observed": "10", "run.window": "10"}, "diffusion.rollout_observed"),
        ({"autoencoder.colour": "rgb"}, "autoencoder.colour"),
        ({"autoencoder.colour": "pooled", "autoencoder.latent": "none"}, "autoencoder.colour"),
        ({"autoencoder.colour_gain": "2", "autoencoder.latent": "ae"}, "autoencoder.colour_gain"),
        ({"autoencoder.colour_gain": "0", "autoencoder.latent": "ae", "autoencoder.colour": "pooled"},
         "autoencoder.colour_gain"),
    ],
)
def test_invalid_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("tiny", None, override)


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="preset"):
        build_config("enormous")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nframes = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config("tiny", str(bad))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_roundtrip_dict():
    cfg = build_config("small", None, {"optim.lr": "2e-4"})
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_tiny_long_is_tiny_with_the_measured_long_run_changes():
    """tiny-long is `tiny` with exactly the changes of the measured 20,000-frame run (Muon, no time limit,
    milestones) and its resampling (eta 0): nothing else may drift apart from `tiny`."""
    from dataclasses import asdict

    tiny, long = asdict(build_config("tiny")), asdict(build_config("tiny-long"))
    changed = {(section, key) for section, fields in tiny.items() if isinstance(fields, dict)
               for key in fields if fields[key] != long[section][key]}
    assert changed == {("optim", "name"), ("diffusion", "ddim_eta"), ("run", "frames"), ("run", "minutes"),
                       ("run", "milestone_every"), ("run", "milestone_clips")}
    assert (long["optim"]["name"], long["diffusion"]["ddim_eta"], long["run"]["frames"], long["run"]["minutes"]) == (
        "muon", 0.0, 20_000, 0.0)


def test_tiny_latent_is_tiny_with_the_measured_latent_changes_and_the_cpu_default(monkeypatch):
    """tiny-latent (the default job on a CPU) is `tiny` with exactly the measured changes: the pooled-colour latent
    in 1x1 patches, a 1,200-step fit, 10 sampler steps, 6,500 frames, and bf16 where the CPU has it (`tiny` pins
    fp32, the precision its rows and the experiment were measured in); on a machine without a GPU it is the default
    preset of `fastdiff train`, while `fastdiff experiment` (colours are what balls-c forgets) trains `tiny`."""
    from dataclasses import asdict

    import torch

    from fastdiff.experiment import experiment_preset

    tiny, latent = asdict(build_config("tiny")), asdict(build_config("tiny-latent"))
    changed = {(section, key): fields[key] for section, fields in latent.items() if isinstance(fields, dict)
               for key in fields if fields[key] != tiny[section][key]}
    assert changed == {("model", "patch"): 1, ("autoencoder", "latent"): "ae", ("autoencoder", "colour"): "pooled",
                       ("autoencoder", "fit_steps"): 1200, ("diffusion", "sample_steps"): 10,
                       ("run", "frames"): 6500, ("run", "precision"): "auto"}
    assert tiny["run"]["precision"] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_config(None).preset == "tiny-latent"
    assert experiment_preset() == "tiny"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_on_cuda_and_on_a_cpu_with_native_bf16_only(monkeypatch, native):
    """run.precision=auto: bf16 on CUDA; on a CPU, bf16 only where it has bf16 instructions (emulated bf16 is slower
    than fp32); explicit choices are kept; the trainer's autocast and the memory estimate resolve it alike."""
    import torch

    from fastdiff import build, config, memory

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    assert config.resolve_precision("auto", "cuda") == "bf16"
    assert config.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert config.resolve_precision("fp32", "cuda") == "fp32" and config.resolve_precision("bf16", "cpu") == "bf16"
    assert build.autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    cfg = build_config("tiny-latent")
    copies = memory.estimate(cfg, (32, 32), 10, "cpu")["autocast_copies"]
    assert (copies > 0) == native
