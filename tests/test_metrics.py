"""The paper's metrics on ground-truth streams: what a perfect model scores, and that wrong videos
score clearly worse. FVD / KVD against scipy and a direct O(n^2) loop."""

import numpy as np
import pytest
import torch

from fastdiff import metrics
from fastdiff.evaluate import HeldoutClips, balls_scores
from fastdiff.streams import make_stream
from fastdiff.streams.balls import COLOR_RGB, SIZE, render


@pytest.fixture(scope="module")
def truth():
    stream = make_stream("balls-c", split="test", seed=3, total_frames=4000)
    return stream.read_with_truth(4000)


def test_detector_finds_the_simulated_centres_and_colours(truth):
    frames, centres, colours = truth
    found, found_colours = metrics.ball_centres(frames, 2)
    assert metrics.ade(found, centres) < 0.15  # pixels, sub-pixel refinement
    assert metrics.colour_accuracy(found, found_colours, centres, colours) > 0.99


def _clips(frames, centres, colours, length=50, count=40):
    starts = np.linspace(0, len(frames) - length - 40, count).astype(int)
    pick = lambda a, s: np.stack([a[i + s:i + s + length] for i in starts])
    return HeldoutClips(pick(frames, 0), starts, len(frames), pick(centres, 0), pick(colours, 0)), starts


def test_min_ade_of_the_ground_truth_is_about_zero_and_a_wrong_continuation_is_not(truth):
    frames, centres, colours = truth
    clips, starts = _clips(frames, centres, colours)
    perfect = balls_scores(clips.frames[:, None], clips, observed=5)
    assert perfect["minADE"] < 0.15
    assert perfect["colour_accuracy"] > 0.98
    late = np.stack([frames[i + 30:i + 80] for i in starts])  # the right balls, 30 frames off
    wrong = balls_scores(np.stack([clips.frames, late], axis=1), clips, observed=5)
    assert wrong["minADE"] < wrong["ADE"]  # min over samples picks the perfect one
    frozen = np.repeat(clips.frames[:, None, 4:5], 50, axis=2)  # balls that stop moving
    assert balls_scores(frozen, clips, observed=5)["minADE"] > 3.0


def test_colour_kl_of_ground_truth_statistics_is_about_zero(truth):
    frames, _, _ = truth
    found, found_colours = metrics.ball_centres(frames, 2)
    counts = metrics.transition_counts(metrics.tracks(found, found_colours))
    assert counts.sum() > 200
    kl, support = metrics.colour_kl(counts)
    assert support == 3
    assert kl < 0.01


def _recolour(colours: np.ndarray, rule: dict) -> np.ndarray:
    """Replay each ball's colour changes under another rule: same change times, other colours."""
    out = colours.copy()
    for ball in range(colours.shape[1]):
        current = colours[0, ball]
        for t in range(1, len(colours)):
            if colours[t, ball] != colours[t - 1, ball]:
                current = rule[int(current)]
            out[t, ball] = current
    return out


def test_a_wrong_colour_rule_gives_a_clearly_positive_colour_kl(truth):
    frames, centres, colours = truth
    cycle = _recolour(colours, {0: 1, 1: 2, 2: 0})  # red -> yellow -> green -> red: not the stream's rule
    box = (centres.astype(np.float64) + 0.5) * SIZE / frames.shape[1]
    wrong = render(box, COLOR_RGB[cycle], res=frames.shape[1])
    found, found_colours = metrics.ball_centres(wrong, 2)
    kl, _ = metrics.colour_kl(metrics.transition_counts(metrics.tracks(found, found_colours)))
    assert kl > 1.0
    # and one that only gets the 50/50 after red wrong (always yellow) is still clearly positive
    always_yellow = np.zeros((3, 3), dtype=np.int64)
    always_yellow[0, 1], always_yellow[1, 0], always_yellow[2, 0] = 100, 50, 50
    assert metrics.colour_kl(always_yellow)[0] > 0.5


def test_colour_kl_matches_the_formula():
    counts = np.array([[0, 30, 10], [20, 0, 0], [0, 0, 0]])
    eps = metrics.PSEUDO_COUNT
    p_red = (counts[0] + eps) / (40 + 3 * eps)
    p_yellow = (counts[1] + eps) / (20 + 3 * eps)
    never_left_green = np.log(3.0)  # green -> red is certain; a model that shows no green change is uniform
    expected = (0.5 * np.log(0.5 / p_red[1]) + 0.5 * np.log(0.5 / p_red[2]) + np.log(1 / p_yellow[0])
                + never_left_green) / 3
    kl, support = metrics.colour_kl(counts)
    assert support == 2
    assert kl == pytest.approx(expected, rel=1e-12)


def test_colour_kl_does_not_reward_a_model_that_shows_one_rule():
    """A model that only ever turns yellow balls red is right about that one rule and silent on the others; it must
    not score as well as one that shows all three rules right (the old mean over shown colours gave it ~0)."""
    one_rule = np.zeros((3, 3), dtype=np.int64)
    one_rule[1, 0] = 8
    all_rules = np.array([[0, 20, 20], [20, 0, 0], [20, 0, 0]])
    assert metrics.colour_kl(all_rules)[0] < 1e-3
    assert metrics.colour_kl(one_rule)[0] > 0.4
    assert metrics.colour_kl(np.zeros((3, 3), dtype=np.int64)) == pytest.approx(
        ((np.log(1.5) + 2 * np.log(3.0)) / 3, 0))  # no change at all: knows nothing, not NaN


def test_frechet_distance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    fake = rng.normal(loc=0.3, size=(250, 12)) @ rng.normal(size=(12, 12))
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(cov_r @ cov_f).real
    expected = ((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean)
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-7)
    assert abs(metrics.frechet_distance(real, real)) < 1e-7 * np.trace(cov_r)


def test_kernel_distance_matches_a_direct_loop():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(9, 5)), rng.normal(loc=0.5, size=(7, 5))
    k = lambda a, b: (a @ b / 5 + 1) ** 3
    within = lambda x: sum(k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j) / (
        len(x) * (len(x) - 1))
    cross = sum(k(a, b) for a in real for b in fake) / (len(real) * len(fake))
    assert metrics.kernel_distance(real, fake) == pytest.approx(within(real) + within(fake) - 2 * cross, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kernel_distance(real[:1], fake)


class _TinyI3D(torch.nn.Module):
    """Stands in for I3D: same call signature as the TorchScript file StyleGAN-V's FVD uses."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3, 4))  # (N, 3)
        return torch.cat([self.proj(pooled), x.std(dim=(2, 3, 4))], dim=1)


def test_i3d_features_from_a_torchscript_file(tmp_path, truth):
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    features = metrics.I3DFeatures(path, torch.device("cpu"), batch=3)
    frames = truth[0]
    videos = np.stack([frames[i:i + 8] for i in range(0, 80, 8)])
    feats = features(videos)
    assert feats.shape == (10, 9)
    assert np.isfinite(feats).all()
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        metrics.I3DFeatures(tmp_path / "missing.pt", torch.device("cpu"))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        metrics.I3DFeatures(tmp_path / "junk.pt", torch.device("cpu"))


def test_floors_bracket_the_truth(truth):
    """The floors every balls evaluation reports: the ground truth scores as the detector's own error, the frozen
    frame badly, and constant velocity exactly where no two balls collide (it reflects off walls as the simulator
    does), so its error comes from ball-ball collisions alone."""
    from fastdiff.evaluate import floor_videos

    frames, centres, colours = truth
    clips, _ = _clips(frames, centres, colours, length=25, count=150)
    videos = floor_videos(clips, observed=5, colour_shift=True)
    scores = {name: balls_scores(v, clips, observed=5) for name, v in videos.items()}
    assert scores["ground truth"]["minADE"] < 0.15 and scores["ground truth"]["ball_count_ok"] > 0.95
    assert scores["repeat last frame"]["minADE"] > 3.0
    assert scores["constant velocity"]["minADE"] < scores["repeat last frame"]["minADE"]
    gap = np.linalg.norm(clips.centres[:, :, 0] - clips.centres[:, :, 1], axis=-1).min(1)  # pixels
    # two ball diameters apart plus a frame's worth of motion (1 box unit): they cannot touch between frames either
    apart = gap > (2 * 1.2 + 1.0) * frames.shape[1] / SIZE
    assert apart.sum() >= 5
    free = balls_scores(videos["constant velocity"][apart], clips.subset(np.flatnonzero(apart)), observed=5)
    assert free["minADE"] < 0.15
    assert np.array_equal(videos["repeat last frame"][:, 0, 20], clips.frames[:, 4])
    assert scores["constant velocity"]["minADE"] > 2 * free["minADE"]  # collisions do cost it


def test_ball_steps_match_balls_across_frames_and_skip_miscounted_frames():
    """Two balls moving 1 and 2 px a frame, listed in the other order in every other frame: the steps are 1 and 2,
    not the distance between the balls; a pair of frames with a wrong count gives no step."""
    t = np.arange(5, dtype=np.float64)
    a = np.stack([3 + t, np.full(5, 5.0)], -1)  # 1 px a frame along x
    b = np.stack([np.full(5, 20.0), 4 + 2 * t], -1)  # 2 px a frame along y
    centres = np.stack([a, b], 1)
    centres[1::2] = centres[1::2, ::-1]
    steps = metrics.ball_steps(centres, np.ones(5, dtype=bool))
    np.testing.assert_allclose(np.sort(steps), [1] * 4 + [2] * 4)
    counted = np.array([True, True, False, True, True])  # only frames 0-1 and 3-4 are a counted pair
    assert len(metrics.ball_steps(centres, counted)) == 4
    assert len(metrics.ball_steps(centres, np.zeros(5, dtype=bool))) == 0


def test_ball_speed_of_the_floors(truth):
    """balls_scores' ball speed: the ground truth's is the simulator's own (from its true centres), the frozen
    frame's is 0, and constant velocity moves as fast as the truth except where collisions change speeds."""
    from fastdiff.evaluate import floor_videos

    frames, centres, colours = truth
    clips, _ = _clips(frames, centres, colours, length=25, count=40)
    videos = floor_videos(clips, observed=5, colour_shift=True)
    speed = {name: balls_scores(v, clips, observed=5)["ball_speed"] for name, v in videos.items()}
    true_speed = np.linalg.norm(np.diff(clips.centres[:, 4:].astype(np.float64), axis=1), axis=-1).mean()
    assert speed["ground truth"] == pytest.approx(true_speed, rel=0.05) and true_speed > 0.3
    assert speed["repeat last frame"] == pytest.approx(0.0, abs=1e-6)
    assert speed["constant velocity"] == pytest.approx(true_speed, rel=0.25)
