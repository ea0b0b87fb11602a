"""The one-call forecast error (fastdiff/evaluate.py): what a model has learned of the balls' motion, measured from
its x0 prediction at the top noise level. Oracle models with known answers: one that knows the future scores the
detector's own error, one that repeats the last frame scores exactly the repeat-last floor, in every
parameterisation; the model is called once, at the top level on the frames to come and clean on the observed ones."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdiff.diffusion import Schedule
from fastdiff.evaluate import (
    CONTACT_PX,
    HeldoutClips,
    contact_windows,
    denoised_videos,
    first_windows,
    floor_videos,
    forecast_error,
    forecast_scores,
    forecast_videos,
    touching_frames,
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


def _clips_with_centres(centres):
    centres = np.asarray(centres, dtype=np.float32)
    n, t = centres.shape[:2]
    return HeldoutClips(np.zeros((n, t, 32, 32, 3), np.uint8), np.zeros(n, int), 1000, centres,
                        np.zeros(centres.shape[:3], int))


def test_contact_windows_are_where_two_balls_meet_from_the_last_observed_frame_on():
    """A pair within CONTACT_PX at the last observed frame or later is a contact; one that met only before it is
    not; any pair of three balls counts; a ball never meets itself; one ball has no contacts."""
    far, near = [[4.0, 4.0], [24.0, 24.0]], [[10.0, 10.0], [10.0 + CONTACT_PX - 0.5, 10.0]]
    window = lambda frames: [frames[i] for i in range(WINDOW)]  # noqa: E731
    met_before = window([near] * (OBSERVED - 1) + [far] * (WINDOW - OBSERVED + 1))
    met_at_last_observed = window([far] * (OBSERVED - 1) + [near] + [far] * (WINDOW - OBSERVED))
    met_at_the_end = window([far] * (WINDOW - 1) + [near])
    just_apart = window([far] * (WINDOW - 1) + [[[10.0, 10.0], [10.0 + CONTACT_PX + 0.5, 10.0]]])
    clips = _clips_with_centres([met_before, met_at_last_observed, met_at_the_end, just_apart])
    assert contact_windows(clips, OBSERVED).tolist() == [False, True, True, False]
    three = [[b[0], [30.0, 2.0], b[1]] for b in met_at_the_end]  # the meeting pair is balls 0 and 2
    assert contact_windows(_clips_with_centres([three]), OBSERVED).tolist() == [True]
    one = [[[5.0, 5.0]]] * WINDOW
    assert contact_windows(_clips_with_centres([one]), OBSERVED).tolist() == [False]


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_denoising_the_true_frames_calls_the_model_once_at_the_level_asked(clips, prediction):
    """denoised_videos: one call, the frames to come at `level` and the observed ones clean; a model that knows
    the answer returns the true frames, and one that returns its noisy input as x0 does not."""
    future = truth_latents(clips)
    schedule = Schedule.make("linear", 1000)
    model = Oracle(lambda x_t, observed: future[: len(x_t)], schedule, prediction)
    videos = denoised_videos(fake_run(model, prediction), clips, OBSERVED, 37)
    (t, observed), = model.calls
    assert torch.equal(t[0], torch.where(observed[0], 0, 37).float())
    np.testing.assert_allclose(videos[:, 0].astype(int), clips.frames[:, :WINDOW].astype(int), atol=1)
    noisy = denoised_videos(fake_run(Oracle(lambda x_t, observed: x_t, schedule, prediction), prediction), clips,
                            OBSERVED, 300)
    assert np.abs(noisy[:, 0, OBSERVED:].astype(int) - clips.frames[:, OBSERVED:WINDOW].astype(int)).mean() > 10
    np.testing.assert_array_equal(noisy[:, 0, :OBSERVED], clips.frames[:, :OBSERVED])
    with pytest.raises(ValueError, match="not a noise level"):
        denoised_videos(fake_run(model, prediction), clips, OBSERVED, 1000)


def test_touching_frames_split_the_frames_after_the_observed_ones_by_distance_and_colour():
    far, near = [[4.0, 4.0], [24.0, 24.0]], [[10.0, 10.0], [10.0 + CONTACT_PX - 0.5, 10.0]]
    track = [far] * OBSERVED + [near, far, near, far, [[10.0, 10.0], [10.0 + CONTACT_PX + 0.5, 10.0]]]
    clips = _clips_with_centres([track, track])
    clips.colours[1, OBSERVED + 2, 1] = 2  # the second meeting of clip 1 is between two colours
    clips.colours[0, OBSERVED + 1] = [0, 1]  # colours of balls apart do not matter
    touching, same = touching_frames(clips, OBSERVED)
    assert touching.tolist() == [[True, False, True, False, False]] * 2
    assert same.tolist() == [[True, False, True, False, False], [True, False, False, False, False]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fastdiff.config import build_config
    from fastdiff.train import OnlineTrainer, write_config

    out = tmp_path_factory.mktemp("runs")
    cfg = build_config("tiny", None, {
        "model.width": "32", "model.depth": "1", "model.heads": "1", "run.frames": "40", "run.threads": "1",
        "run.stream_frames": "3000", "run.final_clips": "0", "run.sample_every": "0", "run.progress": "false",
        "run.out": str(out), "diffusion.sample_steps": "2"})
    path = out / "tiny"
    path.mkdir()
    write_config(cfg, path)
    OnlineTrainer(cfg, path, log=lambda *_: None).train()
    return path


@pytest.fixture(scope="module")
def learning_study():
    """scripts/learning_study.py, imported as a module."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import learning_study
    finally:
        sys.path.pop(0)
    return learning_study


def test_the_studys_contact_split_scores_each_part_and_samples_the_true_future_as_exact(tiny_run, tmp_path,
                                                                                          monkeypatch, learning_study):
    """scripts/learning_study.py contacts on a trained run: the forecast of each part (contact, free) next to the
    floors on the same windows, the parts adding up to the whole; the sampled windows, here a sampler that returns
    the true future, score the detector's own error with every ball in (almost) every frame."""
    import fastdiff.evaluate as evaluate

    calls = []

    def true_future(run, clips, opts):
        calls.append((len(clips.frames), opts.length, opts.observed, opts.samples))
        return clips.frames[:, None, : opts.length]

    monkeypatch.setattr(evaluate, "continuations", true_future)
    out = tmp_path / "contacts.json"
    row, = learning_study.contacts([tiny_run], windows=120, sampled=6, settings=["diffusion.ddim_eta=0"],
                                   threads=1, out=out, denoise=[10, 600])
    assert row == __import__("json").loads(out.read_text())[0]
    assert row["windows"] == 120 and 6 <= row["contact_windows"] <= 114  # both parts are there to be sampled
    parts = row["forecast_px"]
    assert set(parts) == {"all", "contact", "free"}
    for part in parts.values():
        assert set(part) == {"model", "repeat last frame", "constant velocity"}
        assert all(len(errors) == WINDOW - OBSERVED for errors in part.values())
    share = row["contact_windows"] / row["windows"]
    for name in parts["all"]:
        mixed = share * np.array(parts["contact"][name]) + (1 - share) * np.array(parts["free"][name])
        np.testing.assert_allclose(parts["all"][name], mixed, atol=2e-3)
    assert parts["contact"]["constant velocity"][-1] > parts["free"]["constant velocity"][-1]  # it ignores contacts
    assert calls == [(12, WINDOW, OBSERVED, 1)]
    for part in ("contact", "free"):
        sampled = row["sampled"][part]
        assert sampled["windows"] == 6 and sampled["every_ball_frames"] >= 0.9
        assert max(sampled["centre_error_px"]) < 0.3
    denoised = row["denoised"]  # the contact windows' frames after the observed ones, split three ways
    assert sum(denoised["frames"].values()) == row["contact_windows"] * (WINDOW - OBSERVED)
    assert set(denoised["levels"]) == {"10", "600"}  # JSON keys
    assert denoised["truth"]["apart"] == 1.0 and min(denoised["truth"].values()) >= 0.8
    with pytest.raises(SystemExit, match="not supported because its stream"):
        learning_study.contacts([tiny_run], windows=8, sampled=0, settings=["run.stream=maze"], threads=1)


def test_the_studys_heldout_loss_is_the_plain_mse_of_the_x0_prediction(tiny_run, monkeypatch, learning_study):
    """scripts/learning_study.py loss: a model that predicts x0 = 0 everywhere (tiny predicts x0) scores, at every
    level, the mean square of the held-out windows' frames after the observed half; the trained run scores less."""
    import fastdiff.evaluate as evaluate

    trained, = learning_study.heldout([tiny_run], windows=12, threads=1)
    load = learning_study.load_model

    class Zero(torch.nn.Module):
        def forward(self, x, t, observed):
            return torch.zeros_like(x)

    def zero_model(path, settings=()):
        run = load(path, settings)
        run.model = Zero()
        return run

    monkeypatch.setattr(learning_study, "load_model", zero_model)
    zero, = learning_study.heldout([tiny_run], windows=12, threads=1)
    run = load(tiny_run)
    frames = evaluate.evaluation_clips(run, 12, run.window).frames  # (N, K, H, W, 3) uint8
    expect = torch.as_tensor(frames[:, run.window // 2:], dtype=torch.float64).div(127.5).sub(1.0).pow(2).mean()
    assert zero["windows"] == 12 and len(zero["loss_per_level"]) == 10
    for loss in zero["loss_per_level"].values():
        assert loss == pytest.approx(float(expect), rel=1e-5)
    assert 0 < trained["loss"] < zero["loss"]


def test_the_studys_colour_distances_are_pixel_distances_in_pixel_space(tiny_run, learning_study):
    """scripts/learning_study.py colours: in pixel space the latent is the frame, so each pair's latent distance is
    its pixel distance; red against green changes two channels of the ball where red against black changes one."""
    row, = learning_study.colour_distances([tiny_run], frames=16)
    for pair in ("red-none", "red-green", "red-yellow", "yellow-green"):
        assert row[pair]["latent"] == pytest.approx(row[pair]["pixels"], rel=1e-4), pair
    assert row["red-green"]["pixels"] == pytest.approx(2 * row["red-none"]["pixels"], rel=1e-3)
    assert row["red-none"]["pixels"] == pytest.approx(row["yellow-green"]["pixels"], rel=1e-3)
    assert row["red-none"]["pixels"] > 10  # a ball of radius 3.8 px, about 40 lit pixels
