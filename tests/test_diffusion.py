import math

import pytest
import torch

from fastdiff.config import DiffusionConfig
from fastdiff.diffusion import (
    Schedule,
    clamp_prediction,
    clean_estimate,
    ddim_sample,
    heun_sample,
    masked_diffusion_loss,
    predict_x0_eps,
    redrawn_context,
    rollout,
    rollout_chunks,
    rollout_model_calls,
    sample_training_levels,
    sample_window,
    self_condition_estimate,
    training_loss,
)
from fastdiff.models.dit import VideoDiT


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_identities(kind):
    s = Schedule.make(kind, 1000)
    torch.testing.assert_close(s.alpha**2 + s.sigma**2, torch.ones(1000), atol=1e-6, rtol=0)
    assert torch.all(s.alpha[1:] < s.alpha[:-1])  # signal decreases monotonically
    assert s.alpha[0] > 0.99 and s.alpha[-1] < 0.02
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(s.t_from_ve_sigma(s.ve_sigma()[t]), t.float(), atol=1e-3, rtol=0)


def test_linear_matches_ddpm_betas():
    s = Schedule.make("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0)[[0, 999]].sqrt().float()
    torch.testing.assert_close(s.alpha[[0, 999]], expected)


def test_v_and_eps_parameterisations_agree():
    torch.manual_seed(0)
    x0, eps = torch.randn(100), torch.randn(100)
    a, s = 0.6, 0.8
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    x0_hat, eps_hat = predict_x0_eps(v, x_t, a, s, "v")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    x0_hat, _ = predict_x0_eps(eps, x_t, a, s, "eps")
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    x0_hat, eps_hat = predict_x0_eps(x0, x_t, a, s, "x0")
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clamp_prediction_keeps_x0_in_range(prediction):
    torch.manual_seed(0)
    x0, eps = 2.0 * torch.randn(1000), torch.randn(1000)
    a, s = 0.6, 0.8
    x_t = a * x0 + s * eps
    out = {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
    torch.testing.assert_close(clamp_prediction(out, x_t, a, s, prediction, 100.0), out, atol=1e-5, rtol=0)
    x0_clamped, _ = predict_x0_eps(clamp_prediction(out, x_t, a, s, prediction, 1.0), x_t, a, s, prediction)
    torch.testing.assert_close(x0_clamped, x0.clamp(-1, 1), atol=1e-5, rtol=0)


def test_training_levels_patterns():
    g = torch.Generator().manual_seed(0)
    t, obs = sample_training_levels(2000, 10, 1000, 0.5, g, "cpu", observed=5)
    assert t.shape == obs.shape == (2000, 10)
    assert torch.all(t[obs] == 0)
    paper = obs[:, :5].all(1) & ~obs[:, 5:].any(1) & (t[:, 5:] == t[:, 5:6]).all(1)
    assert 0.4 < paper.float().mean() < 0.65  # about half follow the paper's pattern
    free = ~paper
    distinct = torch.tensor([len(set(row[~o].tolist())) for row, o in zip(t[free][:200], obs[free][:200])])
    assert distinct.float().mean() > 4  # independent levels per frame
    assert (obs.sum(1) == 0).any()  # sometimes nothing is observed (pure FIFO queues)


def test_training_levels_follow_the_rollouts_observed_frames():
    """With a rollout that observes 8 of 10 frames, the rollout's pattern keeps those 8 clean and the per-frame
    pattern's clean prefix reaches 8 too (never 9: something is always left to learn); at K/2 it stops at 5."""
    g = torch.Generator().manual_seed(0)
    t, obs = sample_training_levels(4000, 10, 1000, 0.5, g, "cpu", observed=8)
    assert torch.all(t[obs] == 0)
    rollout_rows = obs[:, :8].all(1) & ~obs[:, 8:].any(1) & (t[:, 8:] == t[:, 8:9]).all(1)
    assert 0.4 < rollout_rows.float().mean() < 0.65
    prefix = obs.sum(1)
    assert torch.equal(obs, torch.arange(10) < prefix[:, None])  # always a prefix
    assert int(prefix.max()) == 8 and int(prefix.min()) == 0
    t, obs = sample_training_levels(4000, 10, 1000, 0.5, g, "cpu", observed=5)
    assert int(obs.sum(1).max()) == 5


@pytest.mark.parametrize("observed, new", [(0, 3), (5, 1), (2, 4)])
def test_rollout_windows_observe_rollout_observed_frames(observed, new):
    """Each rollout window observes diffusion.rollout_observed frames (0: K/2) and adds the other K - n; the first
    window, with fewer real frames than that, observes what there is."""
    schedule = Schedule.make("linear", 1000)
    model = _gaussian_denoiser(schedule, 0.0, 1.0)
    cfg = DiffusionConfig(sample_steps=2, rollout_observed=observed)
    chunks = rollout_chunks(model, torch.randn(1, 2, 1, 2, 2), 6, schedule, cfg,
                            generator=torch.Generator().manual_seed(0))
    sizes = [next(chunks).shape[1] for _ in range(4)]
    assert sizes[0] == 6 - 2 and sizes[1:] == [new] * 3


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_observed_frames_never_contribute(prediction):
    """d loss / d noise is exactly zero on observed frames, and not on the others."""
    from fastdiff import ops

    torch.manual_seed(0)
    model = VideoDiT(3, 4, 4, 6, width=32, depth=1, heads=1, context_skip=prediction == "x0")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    s = Schedule.make("linear", 1000)
    x0 = torch.randn(2, 6, 3, 4, 4)
    noise = torch.randn_like(x0, requires_grad=True)
    t, observed = sample_training_levels(2, 6, 1000, 1.0, torch.Generator().manual_seed(1), "cpu", observed=3)
    x_t, target = ops.add_noise(x0, t, observed, s.alpha, s.sigma, noise=noise, prediction=prediction)
    loss = ops.frame_mse_loss(model(x_t, t.float(), observed), target, torch.ones(2, 6), observed)
    loss.backward()
    assert torch.all(noise.grad[observed] == 0)
    assert torch.all(noise.grad[~observed].abs().flatten(1).sum(1) > 0)


def _random_loss_case(paper_prob: float):
    """A small model with random weights (its output layer too), the linear schedule, 3 clean clips of 6 frames
    and training levels behind a clean prefix of 2: (model, schedule, x0, t, observed)."""
    torch.manual_seed(0)
    model = VideoDiT(3, 4, 4, 6, width=32, depth=1, heads=1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x0 = torch.randn(3, 6, 3, 4, 4)
    t, observed = sample_training_levels(3, 6, 1000, paper_prob, torch.Generator().manual_seed(1), "cpu", observed=2)
    return model, Schedule.make("linear", 1000), x0, t, observed


def test_per_window_loss_is_each_windows_mse_over_its_scored_frames():
    """masked_diffusion_loss(per_window=True): the same loss, and each window's unweighted MSE over the frames that
    are neither observed nor excluded, which prioritised replay scores windows by."""
    from fastdiff import ops

    model, s, x0, t, observed = _random_loss_case(paper_prob=1.0)
    excluded = torch.zeros_like(observed)
    excluded[1, 5] = True
    weight = torch.rand(3, 6) + 0.5
    args = (model, x0, t, observed, s, "eps")
    loss, per_window = masked_diffusion_loss(*args, torch.Generator().manual_seed(2), weight=weight,
                                             excluded=excluded, per_window=True)
    alone = masked_diffusion_loss(*args, torch.Generator().manual_seed(2), weight=weight, excluded=excluded)
    assert torch.equal(loss, alone) and loss.requires_grad and not per_window.requires_grad

    x_t, target = ops.add_noise(x0, t, observed, s.alpha, s.sigma, generator=torch.Generator().manual_seed(2),
                                prediction="eps")
    with torch.no_grad():
        per_frame = (model(x_t, t.float(), observed) - target).pow(2).flatten(2).mean(-1)
    scored = ~(observed | excluded)
    expect = torch.stack([per_frame[b][scored[b]].mean() for b in range(3)])
    torch.testing.assert_close(per_window, expect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_x0_loss_weight_scores_the_implied_x0(prediction):
    """diffusion.loss_weight=x0: the training loss of a v (or x0) model is the MSE of the x0 its output implies
    against the clean frames, over the frames that are not observed, at every noise level."""
    from fastdiff import ops
    from fastdiff.diffusion import frame_weights

    model, s, x0, t, observed = _random_loss_case(paper_prob=0.0)
    t[0, 5], t[1, 4] = 999, 1  # the ends of the schedule, where v and x0 differ most
    cfg = DiffusionConfig(prediction=prediction, loss_weight="x0")
    weight = frame_weights(t, s, cfg)
    loss = masked_diffusion_loss(model, x0, t, observed, s, prediction, torch.Generator().manual_seed(2),
                                 weight=weight)
    x_t, _ = ops.add_noise(x0, t, observed, s.alpha, s.sigma, generator=torch.Generator().manual_seed(2),
                           prediction=prediction)
    a, sd = s.alpha[t][..., None, None, None], s.sigma[t][..., None, None, None]
    with torch.no_grad():
        implied, _ = predict_x0_eps(model(x_t, t.float(), observed), x_t, a, sd, prediction)
    per_frame = (implied - x0).pow(2).flatten(2).mean(-1)
    torch.testing.assert_close(loss.detach(), per_frame[~observed].mean(), rtol=1e-5, atol=1e-7)
    plain = masked_diffusion_loss(model, x0, t, observed, s, prediction, torch.Generator().manual_seed(2))
    assert prediction == "x0" or not torch.allclose(plain, loss)  # for v, the weight matters


def test_x0_loss_weight_refuses_eps():
    from fastdiff.config import ConfigError, build_config

    build_config("tiny", None, {"diffusion.loss_weight": "x0", "diffusion.prediction": "v"})
    with pytest.raises(ConfigError, match="unbounded"):
        build_config("tiny", None, {"diffusion.loss_weight": "x0", "diffusion.prediction": "eps"})


def test_foreground_weights_mark_objects_their_rim_and_the_gap_between_two_that_touch():
    """diffusion.foreground_weights: on a uniform background of any colour, the pixels of the objects, one pixel
    around them and a one-pixel gap between two objects count 1 + w times the rest, and every frame's weights
    average 1."""
    from fastdiff.diffusion import foreground_weights

    frames = torch.full((1, 2, 3, 12, 12), -1.0)  # frame 0: black background
    frames[0, 0, 1, 2:6, 2:5] = 0.8  # two green blocks, one background column (5) between them
    frames[0, 0, 1, 2:6, 6:9] = 0.8
    frames[0, 1] = 0.3  # frame 1: a grey background with one dark block, in one channel
    frames[0, 1, 2, 8:10, 8:10] = -0.5
    w = foreground_weights(frames, 4.0)[0, :, 0].double()  # (K, H, W)
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    expect = torch.zeros(2, 12, 12, dtype=torch.bool)
    expect[0, 1:7, 1:10] = True  # both blocks, their rim, and the gap column between them
    expect[1, 7:11, 7:11] = True
    for k in range(2):
        high, low = w[k][expect[k]], w[k][~expect[k]]
        assert torch.allclose(high, high[0]) and torch.allclose(low, low[0]), k
        torch.testing.assert_close(high[0] / low[0], torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(foreground_weights(frames, 0.0), torch.ones(1, 2, 1, 12, 12))


def test_foreground_weighted_loss_is_the_pixel_weighted_mse():
    """training_loss with diffusion.foreground_weight: the mean over the frames that are not observed of each
    frame's foreground-weighted squared error (float64 reference); 0 is the plain loss, bit for bit."""
    from fastdiff import ops
    from fastdiff.diffusion import foreground_weights

    model, s, x0, _, _ = _random_loss_case(paper_prob=0.5)
    x0 = torch.where(torch.rand_like(x0[:, :, :1]) < 0.2, x0, -1.0)  # mostly background, as a balls frame
    cfg = DiffusionConfig(prediction="x0", foreground_weight=3.0)
    loss = training_loss(model, x0, s, cfg, torch.Generator().manual_seed(5))
    plain = training_loss(model, x0, s, DiffusionConfig(prediction="x0"), torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)  # training_loss's draws, in its order
    t, observed = sample_training_levels(3, 6, 1000, cfg.paper_pattern_prob, gen, "cpu", 3)
    x_t, target = ops.add_noise(x0, t, observed, s.alpha, s.sigma, generator=gen, prediction="x0")
    with torch.no_grad():
        error = (model(x_t, t.float(), observed) - target).double().pow(2)
    pixel = foreground_weights(x0, 3.0).double()
    weighted = (pixel * error).flatten(2).mean(-1)[~observed].mean()
    unweighted = error.flatten(2).mean(-1)[~observed].mean()
    torch.testing.assert_close(loss.detach().double(), weighted, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain.detach().double(), unweighted, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weighted, unweighted, rtol=1e-3)


def test_foreground_weight_must_not_be_negative():
    from fastdiff.config import ConfigError, build_config

    build_config("tiny", None, {"diffusion.foreground_weight": "4"})
    with pytest.raises(ConfigError, match="foreground_weight"):
        build_config("tiny", None, {"diffusion.foreground_weight": "-1"})


def _gaussian_denoiser(schedule, mu, std, prediction="eps"):
    """Exact eps- (or x0-) prediction for data x0 ~ N(mu, std^2); accepts fractional t."""

    def model(x, t, observed):
        lo = t.floor().long().clamp(0, schedule.timesteps - 1)
        hi = (lo + 1).clamp(max=schedule.timesteps - 1)
        frac = (t - lo.float())[..., None, None, None]
        a = schedule.alpha[lo][..., None, None, None] * (1 - frac) + schedule.alpha[hi][..., None, None, None] * frac
        s = (1 - a**2).sqrt()
        eps = s * (x - a * mu) / (a**2 * std**2 + s**2)
        return eps if prediction == "eps" else (x - s * eps) / a

    return model


@pytest.mark.parametrize("sampler,prediction", [("ddim", "eps"), ("heun", "eps"), ("ddim", "x0"), ("heun", "x0")])
def test_sampler_recovers_toy_distribution(sampler, prediction):
    schedule = Schedule.make("linear", 1000)
    mu, std = 0.7, 0.3
    model = _gaussian_denoiser(schedule, mu, std, prediction)
    clip = torch.zeros(400, 4, 1, 2, 2)
    observed = torch.zeros(400, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        x = ddim_sample(model, clip, observed, schedule, steps=50, generator=g, prediction=prediction)
    else:
        x = heun_sample(model, clip, observed, schedule, steps=30, generator=g, s_churn=10.0, prediction=prediction)
    assert abs(float(x.mean()) - mu) < 0.03
    assert abs(float(x.std()) - std) < 0.03


def test_samplers_keep_observed_frames():
    schedule = Schedule.make("linear", 1000)
    model = _gaussian_denoiser(schedule, 0.0, 1.0)
    clip = torch.randn(2, 6, 1, 2, 2)
    observed = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for out in (ddim_sample(model, clip, observed, schedule, steps=5),
                heun_sample(model, clip, observed, schedule, steps=5)):
        assert torch.equal(out[observed], clip[observed])


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_rollout_windows_observe_what_observe_returns(sampler):
    """With `observe`, every later window's observed frames are observe(new frames), not the sampled frames, and
    the frames yielded (the video) are the sampled ones; without it, the window observes the sampled frames."""
    schedule = Schedule.make("linear", 1000)
    denoiser = _gaussian_denoiser(schedule, 0.0, 1.0)
    seen = []

    def model(x, t, observed):
        seen.append((x.clone(), observed.clone()))
        return denoiser(x, t, observed)

    cfg = DiffusionConfig(sample_steps=3, sampler=sampler)
    context = torch.randn(2, 3, 1, 2, 2)
    for observe in (lambda z: torch.full_like(z, 7.0), None):
        seen.clear()
        chunks = rollout_chunks(model, context, 6, schedule, cfg, generator=torch.Generator().manual_seed(0),
                                observe=observe)
        first, second = next(chunks), next(chunks)
        assert not torch.any(first == 7.0) and not torch.any(second == 7.0)
        x, observed = seen[-1]  # a call of the second window
        assert observed[:, :3].all() and not observed[:, 3:].any()
        expected = torch.full_like(first, 7.0) if observe is not None else first
        assert torch.equal(x[:, :3], expected)


def test_rollout_length_and_context():
    schedule = Schedule.make("linear", 1000)
    model = _gaussian_denoiser(schedule, 0.0, 1.0)
    cfg = DiffusionConfig(sample_steps=4)
    context = torch.randn(1, 3, 1, 2, 2)
    video = rollout(model, context, 17, 6, schedule, cfg, generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 17, 1, 2, 2)
    assert torch.equal(video[:, :3], context)
    with pytest.raises(ValueError):
        rollout(model, context, 10, 6, schedule, cfg, n_observed=6)


def test_training_loss_is_finite_and_learns():
    torch.manual_seed(0)
    model = VideoDiT(2, 4, 4, 6, width=32, depth=1, heads=1)
    s = Schedule.make("linear", 1000)
    cfg = DiffusionConfig()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = torch.randn(1, 1, 2, 4, 4).expand(8, 6, 2, 4, 4).contiguous()  # one fixed image, learnable
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = training_loss(model, x0, s, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20


def test_untrained_context_skip_model_holds_the_last_observed_frame():
    """With the context skip, an x0 model whose network outputs zero (as at initialisation) continues any video
    by repeating its last observed frame, through the DDIM rollout: the floor it starts from."""
    schedule = Schedule.make("linear", 1000)
    model = VideoDiT(3, 4, 4, 6, width=32, depth=1, heads=1, context_skip=True).eval()
    cfg = DiffusionConfig(prediction="x0", sample_steps=5)
    context = torch.randn(2, 4, 3, 4, 4)
    video = rollout(model, context, 13, 6, schedule, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(video[:, 4:], context[:, -1:].expand(-1, 9, -1, -1, -1), atol=1e-5, rtol=0)
    plain = VideoDiT(3, 4, 4, 6, width=32, depth=1, heads=1).eval()  # without the skip: no such floor
    video = rollout(plain, context, 13, 6, schedule, cfg, generator=torch.Generator().manual_seed(0))
    assert (video[:, 4:] - context[:, -1:]).abs().max() > 0.1


def test_ddim_start_begins_from_the_noised_last_observed_frame():
    """sample_start < 1: DDIM starts low, from the latest observed frame noised to that level, so a model that
    predicts zero noise returns (nearly) that frame; from pure noise (start 1) it returns something else."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.randn(3, 6, 1, 4, 4)
    observed = (torch.arange(6) < 2).expand(3, 6)

    def no_noise(x, t, observed):
        return torch.zeros_like(x)

    low = ddim_sample(no_noise, clip, observed, schedule, steps=4, generator=torch.Generator().manual_seed(0),
                      start=0.01)
    torch.testing.assert_close(low[:, 2:], clip[:, 1:2].expand(-1, 4, -1, -1, -1), atol=0.2, rtol=0)
    full = ddim_sample(no_noise, clip, observed, schedule, steps=4, generator=torch.Generator().manual_seed(0))
    assert (full[:, 2:] - clip[:, 1:2]).abs().max() > 1.0
    from fastdiff.config import ConfigError, build_config

    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="sample_start"):
            build_config("tiny", None, {"diffusion.sample_start": bad})


class _Spy(torch.nn.Module):
    """Records what the model is given; predicts zeros."""

    def forward(self, x, t, observed):
        self.x, self.t, self.observed = x.detach().clone(), t.detach().clone(), observed.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize("context_noise", [0.0, 0.2])
def test_context_noise_noises_observed_frames_at_a_level_the_model_sees(context_noise):
    """With diffusion.context_noise, a window's observed frames are noised to one level below context_noise * T,
    the model is given that level as their timestep, and they stay out of the loss; without it, observed frames
    reach the model clean at t = 0."""
    schedule = Schedule.make("linear", 1000)
    cfg = DiffusionConfig(prediction="x0", paper_pattern_prob=1.0, context_noise=context_noise)
    x0 = torch.rand(64, 6, 1, 4, 4)
    spy = _Spy()
    training_loss(spy, x0, schedule, cfg, torch.Generator().manual_seed(3))
    obs = spy.observed
    assert obs.any()
    t_obs = spy.t[obs]
    differs = (spy.x - x0).flatten(2).abs().amax(2)[obs]  # per observed frame
    if context_noise == 0:
        assert torch.all(t_obs == 0) and torch.all(differs == 0)
        return
    assert t_obs.max() < context_noise * 1000 and t_obs.max() > 0.5 * context_noise * 1000
    per_window = torch.where(obs, spy.t, -1).amax(1)
    assert torch.all((spy.t == per_window[:, None]) | ~obs)  # one level per window
    noised = t_obs > 10
    assert torch.all(differs[noised] > 0)
    # the observed frames stay out of the loss: a prediction that is wrong only there costs nothing
    wrong_on_observed = lambda x, t, observed: torch.where(observed[..., None, None, None], 5.0, 0.0) + 0 * x  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(training_loss(wrong_on_observed, x0, schedule, cfg, gen()),
                               training_loss(lambda x, t, o: torch.zeros_like(x), x0, schedule, cfg, gen()))


def _recording_model(fill: float):
    """A model that predicts `fill` everywhere and records (x, t) of every call in the returned list."""
    seen = []

    def model(x, t, observed):
        seen.append((x.clone(), t.clone()))
        return torch.full_like(x, fill)

    return model, seen


def test_ddim_conditions_on_context_noised_to_the_sampling_level():
    """context_level > 0: every model call sees the observed frames noised once (the same noise in every call)
    and their timestep at that level; the generated frames' levels are unchanged."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.rand(2, 6, 1, 4, 4)
    observed = (torch.arange(6) < 3).expand(2, 6)
    model, seen = _recording_model(0.0)
    ddim_sample(model, clip, observed, schedule, steps=3, prediction="x0", generator=torch.Generator().manual_seed(0),
                context_level=100)
    first_x = seen[0][0][:, :3]
    assert (first_x - clip[:, :3]).abs().max() > 0.05
    for x, t in seen:
        assert torch.equal(x[:, :3], first_x)
        assert torch.all(t[:, :3] == 100)
    assert [int(t[0, 3]) for _, t in seen] == [999, 500, 0]
    seen.clear()
    ddim_sample(model, clip, observed, schedule, steps=3, prediction="x0", generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x[:, :3], clip[:, :3]) and torch.all(t[:, :3] == 0) for x, t in seen)


@pytest.mark.parametrize("lag, delay", [(0.0, 0), (0.34, 1), (1.0, 3)])
def test_ddim_frame_delay_staggers_the_generated_frames(lag, delay):
    """sample_frame_lag, a share of the steps (here 3, so delay = round(lag * 3) calls): the j-th generated frame
    waits at the start level, untouched, for j * delay calls, then takes the same ladder of levels as every other
    frame, then goes in clean at level 0; observed frames stay at 0. Delay 0 is the synchronous window. Reached
    through sample_window, so the config setting is what is tested."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.rand(2, 7, 1, 4, 4)
    observed = (torch.arange(7) < 3).expand(2, 7)
    model, seen = _recording_model(0.5)
    cfg = DiffusionConfig(prediction="x0", sample_steps=3, sample_frame_lag=lag)
    out = sample_window(model, clip, observed, schedule, cfg, generator=torch.Generator().manual_seed(0))
    ladder = [999, 500, 0]
    assert len(seen) == 3 + 3 * delay  # 4 generated frames
    for j in range(4):
        levels = [int(t[0, 3 + j]) for _, t in seen]
        assert levels == [999] * (j * delay) + ladder + [0] * ((3 - j) * delay), (j, levels)
        for x, _ in seen[1:j * delay + 1]:  # not begun: the frame is still the starting noise
            assert torch.equal(x[:, 3 + j], seen[0][0][:, 3 + j])
    assert all(torch.all(t[:, :3] == 0) and torch.equal(x[:, :3], clip[:, :3]) for x, t in seen)
    torch.testing.assert_close(out[:, 3:], torch.full_like(out[:, 3:], 0.5))  # every frame reached the clean end
    torch.testing.assert_close(out[:, :3], clip[:, :3])
    from fastdiff.config import ConfigError, build_config

    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="sample_frame_lag"):
            build_config("tiny", None, {"diffusion.sample_frame_lag": bad})


@pytest.mark.parametrize("spacing, ladder", [(1.0, [999, 666, 333, 0]), (0.5, [999, 816, 577, 0]),
                                             (2.0, [999, 444, 111, 0])])
def test_ddim_spacing_shapes_the_ladder_of_levels(spacing, ladder):
    """diffusion.sample_spacing: the levels top * (1 - u)^spacing, u = 0, 1/3, 2/3, 1 for 4 steps, then clean."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.rand(2, 5, 1, 4, 4)
    observed = (torch.arange(5) < 2).expand(2, 5)
    model, seen = _recording_model(0.5)
    cfg = DiffusionConfig(prediction="x0", sample_steps=4, sample_spacing=spacing)
    out = sample_window(model, clip, observed, schedule, cfg, generator=torch.Generator().manual_seed(0))
    assert [int(t[0, 2]) for _, t in seen] == ladder
    torch.testing.assert_close(out[:, 2:], torch.full_like(out[:, 2:], 0.5))
    from fastdiff.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="sample_spacing"):
        build_config("tiny", None, {"diffusion.sample_spacing": "0"})


@pytest.mark.parametrize("lag", [0.3, 0.5, 1.0])
def test_staggered_training_windows_are_the_pyramid_samplers(lag):
    """diffusion.train_staggered: every window the pyramid sampler shows the model (recorded through
    sample_window) has a training draw within a few levels on every frame, and every staggered training window
    lies on the sampler's ladder: neighbouring generated frames that are both mid-schedule sit the frame delay's
    levels apart. The shared level of the paper's window (train_staggered off) covers almost none of them."""
    from fastdiff.diffusion import observed_frames, training_stagger

    schedule = Schedule.make("linear", 1000)
    cfg = DiffusionConfig(prediction="x0", sample_steps=20, sample_frame_lag=lag, train_staggered=True)
    k, n_obs = 10, observed_frames(cfg, 10)
    model, seen = _recording_model(0.5)
    observed = (torch.arange(k) < n_obs).expand(1, k)
    sample_window(model, torch.rand(1, k, 1, 2, 2), observed, schedule, cfg, generator=torch.Generator().manual_seed(0))
    sampler_levels = torch.stack([t[0, n_obs:] for _, t in seen]).long()  # (calls, generated)
    assert len(sampler_levels) > 20  # staggered: more calls than one frame's steps

    def nearest_gap(stagger: float) -> torch.Tensor:
        t, obs = sample_training_levels(6000, k, 1000, 1.0, torch.Generator().manual_seed(1), "cpu", n_obs,
                                        stagger)
        assert torch.all(obs[:, :n_obs]) and not obs[:, n_obs:].any()
        return (sampler_levels[:, None] - t[None, :, n_obs:]).abs().amax(2).amin(1), t

    gap, t = nearest_gap(training_stagger(cfg))
    assert int(gap.max()) <= 8, gap
    mid = (t[:, n_obs:] > 0) & (t[:, n_obs:] < 999)
    both = mid[:, 1:] & mid[:, :-1]
    steps = (t[:, n_obs + 1:] - t[:, n_obs:-1])[both]
    if training_stagger(cfg) < 1:
        assert both.sum() > 100 and torch.all((steps - training_stagger(cfg) * 999).abs() <= 1)
    else:  # a frame begins only once the one before is clean: one frame mid-schedule at a time
        assert int(mid.sum(1).max()) == 1
    off_gap, _ = nearest_gap(training_stagger(DiffusionConfig(sample_frame_lag=lag)))  # train_staggered off: 0
    assert (off_gap > 100).float().mean() > 0.5


def test_context_noise_settings_are_checked():
    from fastdiff.config import ConfigError, build_config

    for field in ("diffusion.context_noise", "diffusion.sample_context_noise", "diffusion.context_redraw_level"):
        for bad in ("-0.1", "1.0"):
            with pytest.raises(ConfigError, match=field):
                build_config("tiny", None, {field: bad})
    with pytest.raises(ConfigError, match="not supported because the Heun sampler"):
        build_config("tiny", None, {"diffusion.sample_context_noise": "0.1", "diffusion.sampler": "heun"})
    for bad in ({"diffusion.sample_frame_lag": "0"}, {"diffusion.sampler": "heun"}, {"diffusion.sample_start": "0.6"}):
        with pytest.raises(ConfigError, match="train_staggered is not supported without the pyramid sampler"):
            build_config("tiny", None, {"diffusion.train_staggered": "true", **bad})
    assert build_config("tiny", None, {"diffusion.train_staggered": "true"}).diffusion.train_staggered  # tiny's pyramid
    for bad in ({"diffusion.history_guidance": "-1"},
                {"diffusion.history_guidance": "1", "diffusion.sampler": "heun"}):
        with pytest.raises(ConfigError, match="history_guidance: must be >= 0, and is supported with the ddim"):
            build_config("tiny", None, bad)
    assert build_config("tiny", None, {"diffusion.history_guidance": "1.5"}).diffusion.history_guidance == 1.5


def test_sample_window_refuses_context_noise_when_the_caller_picks_heun():
    """The `sampler` argument can pick Heun after config validation passed a DDIM config: sample_window refuses
    context noise itself, and samples with Heun when there is none."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.rand(1, 4, 1, 4, 4)
    observed = (torch.arange(4) < 2).expand(1, 4)
    model = lambda x, t, observed: torch.zeros_like(x)  # noqa: E731
    noised = DiffusionConfig(sampler="ddim", sample_steps=2, sample_context_noise=0.1)
    with pytest.raises(ValueError, match="not supported because the Heun sampler"):
        sample_window(model, clip, observed, schedule, noised, sampler="heun")
    out = sample_window(model, clip, observed, schedule, DiffusionConfig(sampler="ddim", sample_steps=2),
                        generator=torch.Generator().manual_seed(0), sampler="heun")
    assert out.shape == clip.shape and torch.equal(out[:, :2], clip[:, :2])


@pytest.mark.parametrize("sampler,steps,lag,window,observed,context,total", [
    ("ddim", 4, 0.0, 6, 0, 3, 17),  # synchronous windows, a last window past the total
    ("ddim", 4, 0.5, 6, 0, 3, 17),  # pyramid: 2 calls between the starts of successive frames
    ("ddim", 5, 1.0, 7, 2, 4, 20),  # observes 2 of 7: 5 new frames a window
    ("ddim", 4, 0.5, 6, 0, 1, 12),  # a first window that observes fewer frames than the others
    ("heun", 3, 0.0, 6, 0, 3, 11),
])
def test_rollout_model_calls_counts_the_calls_a_rollout_makes(sampler, steps, lag, window, observed, context, total):
    """The planner's count (fastdiff.diffusion.rollout_model_calls) against the model calls of a real rollout."""
    schedule = Schedule.make("linear", 1000)
    denoiser = _gaussian_denoiser(schedule, 0.0, 1.0)
    calls = []

    def counted(x, t, obs):
        calls.append(1)
        return denoiser(x, t, obs)

    cfg = DiffusionConfig(sample_steps=steps, sample_frame_lag=lag, rollout_observed=observed, sampler=sampler)
    video = rollout(counted, torch.randn(2, context, 1, 2, 2), total, window, schedule, cfg,
                    generator=torch.Generator().manual_seed(0))
    assert video.shape[1] == total
    assert rollout_model_calls(cfg, window, context, total) == len(calls) > 0


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_history_guidance_steps_with_cond_plus_w_times_cond_minus_uncond(w):
    """One DDIM step to clean with x0 prediction returns the model's (guided) x0. A model that predicts 1 where a
    row sees its history and 0.2 where it does not gives 1 + w * 0.8; the unconditional half of each call sees no
    observed frame, its history as noise at level T - 1, and the generated frames as the conditional half does."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.randn(2, 6, 1, 2, 2)
    observed = (torch.arange(6) < 3).expand(2, 6)
    seen = []

    def model(x, t, obs):
        seen.append((x.clone(), t.clone(), obs.clone()))
        return torch.where(obs.any(1), 1.0, 0.2)[:, None, None, None, None].expand_as(x).clone()

    out = ddim_sample(model, clip, observed, schedule, steps=1, prediction="x0", history_guidance=w,
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 3:], torch.full_like(out[:, 3:], 1 + w * 0.8))
    assert torch.equal(out[:, :3], clip[:, :3])
    x, t, obs = seen[0]
    assert x.shape[0] == 4 and torch.equal(obs[:2], observed) and not obs[2:].any()
    assert (t[2:, :3] == schedule.timesteps - 1).all() and torch.equal(t[2:, 3:], t[:2, 3:])
    assert torch.equal(x[:2, :3], clip[:, :3]) and not torch.equal(x[2:, :3], clip[:, :3])
    assert torch.equal(x[2:, 3:], x[:2, 3:])
    unguided = ddim_sample(model, clip, observed, schedule, steps=1, prediction="x0")
    assert torch.allclose(unguided[:, 3:], torch.ones_like(unguided[:, 3:]))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clean_estimate_is_the_implied_x0_with_observed_frames_zeroed(prediction):
    """A model output that is exactly right in its parameterisation gives back the clean frames (float64), except
    on the observed frames, which the estimate leaves at zero."""
    alpha = Schedule.make("linear", 1000).alpha.double()
    double = Schedule(alpha=alpha, sigma=(1 - alpha**2).sqrt())  # alpha^2 + sigma^2 = 1 to float64's precision
    x0, eps = torch.randn(3, 5, 2, 3, 4, dtype=torch.float64), torch.randn(3, 5, 2, 3, 4, dtype=torch.float64)
    t = torch.randint(1, 1000, (3, 5))
    observed = torch.tensor([[True, False, False, True, False]] * 3)
    a = double.alpha[t][..., None, None, None]
    s = double.sigma[t][..., None, None, None]
    x_t = a * x0 + s * eps
    out = {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
    got = clean_estimate(out, x_t, t, observed, double, prediction)
    torch.testing.assert_close(got[~observed], x0[~observed], rtol=1e-9, atol=1e-9)
    assert torch.all(got[observed] == 0)


class _EstimateSpy(torch.nn.Module):
    """An x0 model that records every call's inputs and returns :meth:`output`: x * 2 + 0.001 * t, plus the
    estimate when one is given (so its output tells an estimate-reading call from one without)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = []

    @staticmethod
    def output(x, t, estimate=None, scale=2.0):
        out = x * scale + 0.001 * t[:, :, None, None, None]
        return out if estimate is None else out + estimate

    def forward(self, x, t, observed, estimate=None):
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "observed": observed.clone(),
                           "estimate": None if estimate is None else estimate.detach().clone(),
                           "grad": torch.is_grad_enabled()})
        return self.output(x, t, estimate, self.scale)


def test_training_self_condition_estimate_is_the_models_own_gradient_free_x0_in_half_the_windows():
    """self_condition_estimate: one gradient-free call at the same noisy input, level and observed frames, with no
    estimate; its x0 (observed frames zeroed) in some windows, zeros in the others, both drawn over 200 windows;
    the returned estimate carries no gradient."""
    schedule = Schedule.make("linear", 1000)
    x_t = torch.randn(200, 4, 1, 2, 2)
    t = torch.randint(1, 1000, (200, 4))
    observed = (torch.arange(4) < 2).expand(200, 4)
    spy = _EstimateSpy()
    estimate = self_condition_estimate(spy, x_t, t, observed, schedule, "x0", torch.Generator().manual_seed(0))
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert not call["grad"] and call["estimate"] is None
    assert torch.equal(call["x"], x_t) and torch.equal(call["t"], t.float()) and torch.equal(call["observed"], observed)
    assert not estimate.requires_grad
    own = _EstimateSpy.output(x_t, t).masked_fill(observed[:, :, None, None, None], 0.0)
    kept = estimate.flatten(1).abs().amax(1) > 0
    assert 60 < int(kept.sum()) < 140  # both kinds, about half
    torch.testing.assert_close(estimate[kept], own[kept])
    assert torch.all(estimate[~kept] == 0) and torch.all(estimate[:, :2] == 0)


def test_self_conditioned_loss_trains_the_second_call_on_the_first_calls_estimate():
    """masked_diffusion_loss(self_condition=True): the graded call reads the estimate of the gradient-free one (the
    same x_t and levels), and the loss is its masked MSE; without, one call and no estimate."""
    schedule = Schedule.make("linear", 1000)
    x0 = torch.randn(16, 4, 1, 2, 2)
    t = torch.randint(1, 1000, (16, 4)).masked_fill((torch.arange(4) < 2).expand(16, 4), 0)
    observed = (torch.arange(4) < 2).expand(16, 4)
    spy = _EstimateSpy()
    loss = masked_diffusion_loss(spy, x0, t, observed, schedule, "x0", torch.Generator().manual_seed(1),
                                 self_condition=True)
    first, second = spy.calls
    assert torch.equal(first["x"], second["x"]) and torch.equal(first["t"], second["t"])
    assert first["estimate"] is None and second["grad"]
    implied = _EstimateSpy.output(first["x"], first["t"]).masked_fill(observed[:, :, None, None, None], 0.0)
    kept = second["estimate"].flatten(1).abs().amax(1) > 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(second["estimate"][kept], implied[kept])
    pred = _EstimateSpy.output(second["x"], second["t"], second["estimate"])
    torch.testing.assert_close(loss, ((pred - x0)[:, 2:] ** 2).mean())
    loss.backward()  # the gradient flows through the graded call only
    assert spy.scale.grad is not None
    spy.calls.clear()
    masked_diffusion_loss(spy, x0, t, observed, schedule, "x0", torch.Generator().manual_seed(1))
    assert len(spy.calls) == 1 and spy.calls[0]["estimate"] is None


def test_ddim_hands_each_call_the_clean_estimate_of_the_call_before():
    """ddim_sample(self_condition=True): zeros at the first call; every later call reads the x0 the previous call
    predicted (an x0 model: its output), zero on the observed frames; also through the pyramid schedule."""
    schedule = Schedule.make("linear", 1000)
    clip = torch.randn(2, 6, 1, 2, 2)
    observed = (torch.arange(6) < 3).expand(2, 6)
    spy = _EstimateSpy()
    ddim_sample(spy, clip, observed, schedule, steps=4, prediction="x0", eta=1.0, frame_delay=1,
                generator=torch.Generator().manual_seed(0), self_condition=True)
    assert len(spy.calls) == 4 + 2
    assert torch.all(spy.calls[0]["estimate"] == 0)
    for before, after in zip(spy.calls, spy.calls[1:]):
        out = _EstimateSpy.output(before["x"], before["t"], before["estimate"])
        torch.testing.assert_close(after["estimate"], out.masked_fill(observed[:, :, None, None, None], 0.0))
    spy.calls.clear()
    ddim_sample(spy, clip, observed, schedule, steps=2, prediction="x0")
    assert all(call["estimate"] is None for call in spy.calls)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_redrawn_context_is_the_models_gradient_free_drawing_of_the_observed_frames(share):
    """redrawn_context: one gradient-free call that holds no frame clean, the observed frames at one level per
    window below context_redraw_level * T and the others at T - 1; its x0 replaces the observed frames of a share
    of the windows (about half of 200, or all), and every other frame keeps the clean clip's content."""
    schedule = Schedule.make("linear", 1000)
    cfg = DiffusionConfig(prediction="x0", context_redraw=share, context_redraw_level=0.3)
    x0 = torch.randn(200, 4, 1, 2, 2)
    observed = (torch.arange(4) < 2).expand(200, 4)
    spy = _EstimateSpy()
    got = redrawn_context(spy, x0, observed, schedule, cfg, torch.Generator().manual_seed(0))
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert not call["grad"] and call["estimate"] is None and not call["observed"].any()
    level = call["t"][:, :2].long()
    assert torch.equal(level, level[:, :1].expand(200, 2)) and level.max() < 300 and level.max() > 200
    assert torch.all(call["t"][:, 2:] == 999)
    a = schedule.alpha[level][..., None, None, None]
    s = schedule.sigma[level][..., None, None, None]
    noise = (call["x"][:, :2] - a * x0[:, :2]) / s  # the call's input is x0 noised at its level
    assert 0.9 < float(noise.std()) < 1.1
    drawn = _EstimateSpy.output(call["x"], call["t"])[:, :2]
    redrawn = (got[:, :2] != x0[:, :2]).flatten(1).any(1)
    if share == 1.0:
        assert redrawn.all()
    else:
        assert 60 < int(redrawn.sum()) < 140
    torch.testing.assert_close(got[redrawn, :2], drawn[redrawn])
    assert torch.equal(got[~redrawn], x0[~redrawn]) and torch.equal(got[:, 2:], x0[:, 2:])


def test_training_loss_with_redrawn_context_grades_the_true_frames_after_the_drawn_ones():
    """training_loss(context_redraw=1): the graded call observes the first call's drawing of the context, and the
    loss is its MSE against the true frames to predict; with context_redraw 0, one call on the true clip."""
    schedule = Schedule.make("linear", 1000)
    x0 = torch.randn(16, 4, 1, 2, 2)
    spy = _EstimateSpy()
    cfg = DiffusionConfig(prediction="x0", paper_pattern_prob=1.0, context_redraw=1.0)
    loss = training_loss(spy, x0, schedule, cfg, torch.Generator().manual_seed(1))
    first, second = spy.calls
    assert not first["grad"] and second["grad"]
    observed = second["observed"]
    assert torch.equal(observed, (torch.arange(4) < 2).expand(16, 4))
    torch.testing.assert_close(second["x"][:, :2], _EstimateSpy.output(first["x"], first["t"])[:, :2])
    pred = _EstimateSpy.output(second["x"], second["t"])
    torch.testing.assert_close(loss, ((pred - x0)[:, 2:] ** 2).mean())
    spy.calls.clear()
    training_loss(spy, x0, schedule, DiffusionConfig(prediction="x0", paper_pattern_prob=1.0),
                  torch.Generator().manual_seed(1))
    assert len(spy.calls) == 1 and torch.equal(spy.calls[0]["x"][:, :2], x0[:, :2])


def test_context_redraw_settings_are_checked():
    from fastdiff.config import ConfigError, build_config

    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="diffusion.context_redraw: must be in"):
            build_config("tiny", None, {"diffusion.context_redraw": bad})
    with pytest.raises(ConfigError, match="context_redraw with replay.strategy=gen-distill not supported"):
        build_config("tiny", None, {"diffusion.context_redraw": "0.5", "replay.strategy": "gen-distill"})
    assert build_config("tiny", None, {"diffusion.context_redraw": "1"}).diffusion.context_redraw == 1.0
