"""The one-call forecast error (fastdiff/evaluate.py): what a model has learned of the balls' motion, measured from
its x0 prediction at the top noise level. Oracle models with known answers: one that knows the future scores the
detector's own error, one that repeats the last frame scores exactly the repeat-last floor, in every
parameterisation; the model is called once, at the top level on the frames to come and clean on the observed ones."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdiff.diffusion import Schedule
from fastdiff.evaluate import (
    HeldoutClips,
    first_windows,
    floor_videos,
    forecast_error,
    forecast_scores,
    forecast_videos,
)
from fastdiff.models.autoencoder import PixelSpace
from fastdiff.streams import make_stream

WINDOW, OBSERVED = 10, 5


@pytest.fixture(scope="module")
def clips():
    frames, centres, colours = make_stream("balls-o", split="test", seed=5, total_frames=3000).read_with_truth(3000)
    starts = np.linspace(0, len(frames) - 3 * WINDOW, 48).astype(int)
    pick = lambda a: np.stack([a[s:s + 2 * WINDOW] for s in starts])  # longer than a window: only the first counts
    return HeldoutClips(pick(frames), starts, len(frames), pick(centres), pick(colours))


def fake_run(model, prediction: str):
    cfg = SimpleNamespace(diffusion=SimpleNamespace(prediction=prediction), run=SimpleNamespace(stream="balls-o"),
                          autoencoder=SimpleNamespace(latent="none"))
    return SimpleNamespace(cfg=cfg, model=model, autoencoder=PixelSpace(), schedule=Schedule.make("linear", 1000),
                           window=WINDOW, device=torch.device("cpu"), frame_shape=(32, 32, 3))


def as_output(x0, x_t, t, schedule, prediction):
    """The model output that means x0 in `prediction`'s parameterisation at x_t."""
    a, s = schedule.alpha[t][..., None, None, None], schedule.sigma[t][..., None, None, None]
    eps = (x_t - a * x0) / s
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[prediction]


class Oracle:
    """A model that answers with `guess(x_t, observed)` as x0, and records how it was called."""

    def __init__(self, guess, schedule, prediction):
        self.guess, self.schedule, self.prediction, self.calls = guess, schedule, prediction, []

    def __call__(self, x_t, t, observed):
        self.calls.append((t.clone(), observed.clone()))
        out = as_output(self.guess(x_t, observed), x_t, t.long(), self.schedule, self.prediction)
        return torch.where(observed[:, :, None, None, None], torch.zeros_like(out), out)  # ignored there


def truth_latents(clips):
    return PixelSpace().encode(torch.from_numpy(clips.frames[:, :WINDOW]).flatten(0, 1)).view(
        len(clips.frames), WINDOW, 3, 32, 32)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_a_model_that_knows_the_future_scores_the_detectors_error(clips, prediction):
    future = truth_latents(clips)
    schedule = Schedule.make("linear", 1000)
    model = Oracle(lambda x_t, observed: future[: len(x_t)], schedule, prediction)
    videos = forecast_videos(fake_run(model, prediction), clips, OBSERVED)
    assert videos.shape == (len(clips.frames), 1, WINDOW, 32, 32, 3)
    errors = forecast_error(videos, clips, OBSERVED)
    assert errors.shape == (WINDOW - OBSERVED,)
    assert errors.max() < 0.15, errors
    (t, observed), = model.calls  # one call, the frames to come at the top level, the observed ones clean
    assert torch.equal(observed[0], torch.arange(WINDOW) < OBSERVED)
    assert torch.equal(t[0], torch.where(observed[0], 0, 999).float())


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_a_model_that_repeats_the_last_frame_scores_the_repeat_floor(clips, prediction):
    schedule = Schedule.make("linear", 1000)
    last = lambda x_t, observed: x_t[:, OBSERVED - 1:OBSERVED].expand_as(x_t)
    run = fake_run(Oracle(last, schedule, prediction), prediction)
    errors = forecast_error(forecast_videos(run, clips, OBSERVED), clips, OBSERVED)
    first = first_windows(clips, WINDOW)
    floor = forecast_error(floor_videos(first, OBSERVED, colour_shift=False)["repeat last frame"], first, OBSERVED)
    np.testing.assert_allclose(errors, floor, atol=1e-6)
    true_steps = np.linalg.norm(clips.centres[:, OBSERVED:WINDOW] - clips.centres[:, OBSERVED - 1:OBSERVED], axis=-1)
    assert errors[0] > 0.5 and np.all(np.diff(errors) > 0)  # the balls move on: the frozen guess falls behind
    np.testing.assert_allclose(errors, true_steps.mean((0, 2)), atol=0.15)  # per-frame matching aside


def test_forecast_scores_put_the_model_between_the_floors(clips):
    """The model row and both floors, on the same first windows; a perfect model beats both."""
    future = truth_latents(clips)
    schedule = Schedule.make("linear", 1000)
    run = fake_run(Oracle(lambda x_t, observed: future[: len(x_t)], schedule, "x0"), "x0")
    scores = forecast_scores(run, clips, OBSERVED)
    rows = scores["forecast_error_per_frame"]
    assert set(rows) == {"model", "repeat last frame", "constant velocity"}
    assert scores["forecast_windows"] == len(clips.frames)
    assert scores["forecast_error"] == pytest.approx(np.mean(rows["model"]), abs=1e-4)
    assert np.mean(rows["model"]) < np.mean(rows["constant velocity"]) < np.mean(rows["repeat last frame"])
