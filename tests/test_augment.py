import numpy as np
import pytest
import torch

from fastdiff.augment import symmetry_augment
from fastdiff.streams.balls import SIZE, render


def _images(window: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The 4 (flips) or 8 (d4) mirror images of one window (K, C, H, W)."""
    flips = [window, window.flip(-1), window.flip(-2), window.flip(-1).flip(-2)]
    return flips + [f.transpose(-1, -2) for f in flips] if kind == "d4" else flips


@pytest.mark.parametrize("kind", ["flips", "d4"])
def test_every_window_is_one_mirror_image_of_itself_and_all_images_are_drawn(kind):
    """Each window comes back as one of its mirror images, the same one for all its frames; over 256 windows every
    image of the group appears, and the draws are the generator's."""
    torch.manual_seed(0)
    clips = torch.randn(256, 3, 2, 5, 5)
    out = symmetry_augment(clips, kind, torch.Generator().manual_seed(1))
    seen = set()
    for window, got in zip(clips, out):
        matches = [i for i, image in enumerate(_images(window, kind)) if torch.equal(got, image)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(4 if kind == "flips" else 8))
    assert torch.equal(out, symmetry_augment(clips, kind, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, symmetry_augment(clips, kind, torch.Generator().manual_seed(2)))


def test_none_returns_the_windows_and_d4_refuses_a_frame_that_is_not_square():
    clips = torch.randn(2, 3, 1, 4, 6)
    assert symmetry_augment(clips, "none", torch.Generator()) is clips
    assert symmetry_augment(clips, "flips", torch.Generator()).shape == clips.shape
    with pytest.raises(ValueError, match="not supported because a transpose"):
        symmetry_augment(clips, "d4", torch.Generator())
    with pytest.raises(ValueError, match="not one of"):
        symmetry_augment(clips, "rotate", torch.Generator())


def test_a_mirrored_balls_frame_is_the_frame_of_the_mirrored_balls():
    """The premise of augmenting balls: the renderer draws the mirrored positions as the mirrored frame, to the
    uint8 level (x is columns, y rows)."""
    rng = np.random.RandomState(0)
    pos = rng.uniform(1.5, SIZE - 1.5, (6, 2, 2))
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[None].repeat(6, 0)
    frames = render(pos, colors)  # (N, H, W, 3)
    mirrored_x = pos.copy()
    mirrored_x[..., 0] = SIZE - pos[..., 0]
    mirrored_y = pos.copy()
    mirrored_y[..., 1] = SIZE - pos[..., 1]
    assert np.array_equal(render(mirrored_x, colors), frames[:, :, ::-1])
    assert np.array_equal(render(mirrored_y, colors), frames[:, ::-1])
    assert np.array_equal(render(pos[..., ::-1].copy(), colors), frames.transpose(0, 2, 1, 3))


def test_augment_is_refused_with_latents_and_trains_a_run(tmp_path):
    from fastdiff.config import ConfigError, build_config
    from fastdiff.train import OnlineTrainer

    with pytest.raises(ConfigError, match="latents do not mirror"):
        build_config("tiny", None, {"run.augment": "flips", "autoencoder.latent": "ae"})
    with pytest.raises(ConfigError, match="run.augment"):
        build_config("tiny", None, {"run.augment": "rotate"})
    cfg = build_config("tiny", None, {
        "model.width": "32", "model.depth": "1", "model.heads": "1", "run.augment": "d4", "run.frames": "16",
        "run.threads": "1", "run.stream_frames": "3000", "run.final_clips": "0", "run.sample_every": "0",
        "run.progress": "false", "run.out": str(tmp_path)})
    trainer = OnlineTrainer(cfg, tmp_path, log=lambda *_: None)
    trainer.train()
    assert trainer.step.frames_seen == 16
