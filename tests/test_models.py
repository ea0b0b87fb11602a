import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff.models import dit
from fastdiff.models.autoencoder import (
    FrameAutoencoder,
    PixelSpace,
    pixels_to_unit,
    reencoder,
    rollout_space,
    unit_to_pixels,
)
from fastdiff.models.dit import (
    LocalMixMLP,
    SpatialAttention,
    TemporalAttention,
    VideoDiT,
    count_parameters,
    depthwise_conv3d,
    grid_offsets,
    last_observed,
)


@pytest.mark.parametrize("patch, hw", [(1, (8, 8)), (2, (8, 12))])
def test_dit_shapes(patch, hw):
    torch.manual_seed(0)
    model = VideoDiT(4, hw[0], hw[1], 10, width=64, depth=2, heads=2, patch=patch)
    x = torch.randn(3, 10, 4, *hw)
    t = torch.randint(0, 1000, (3, 10)).float()
    observed = torch.rand(3, 10) < 0.3
    out = model(x, t, observed)
    assert out.shape == x.shape
    # adaLN-zero + zero output layer: a fresh model predicts exactly zero ...
    assert torch.count_nonzero(out) == 0
    # ... but is not dead: gradients reach the output layer.
    (out * torch.randn_like(x)).sum().backward()
    assert model.out.weight.grad is not None and model.out.weight.grad.abs().sum() > 0


def test_dit_uses_every_frame_condition():
    torch.manual_seed(0)
    model = VideoDiT(3, 8, 8, 6, width=64, depth=2, heads=2)
    for p in model.parameters():  # leave adaLN-zero so that the output depends on the inputs
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 6, 3, 8, 8)
    t = torch.full((1, 6), 500.0)
    obs = torch.zeros(1, 6, dtype=torch.bool)
    base = model(x, t, obs)
    t2 = t.clone()
    t2[0, 4] = 10.0
    changed = model(x, t2, obs)
    # changing frame 4's timestep changes frame 4 most, and other frames through temporal attention
    assert (changed - base)[0, 4].abs().mean() > 0
    assert (changed - base)[0, 0].abs().mean() > 0
    obs2 = obs.clone()
    obs2[0, 1] = True
    assert not torch.allclose(model(x, t, obs2), base)


@pytest.mark.parametrize("frame_pos", [False, True])
def test_frame_pos_tells_identical_frames_apart(frame_pos):
    """Identical frames with identical conditions are indistinguishable to the model unless their tokens carry the
    frame's index: only then does the output differ from frame to frame (and it depends on the order)."""
    torch.manual_seed(0)
    model = VideoDiT(3, 8, 8, 6, width=64, depth=1, heads=2, patch=2, frame_pos=frame_pos)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 3, 8, 8).expand(1, 6, 3, 8, 8)
    out = model(x, torch.full((1, 6), 300.0), torch.zeros(1, 6, dtype=torch.bool))
    spread = (out - out[:, :1]).abs().amax()
    if frame_pos:
        assert spread > 1e-3
    else:
        assert spread < 1e-5


@pytest.mark.parametrize("joint", [False, True])
def test_joint_attention_reaches_other_frames_in_one_hop(joint):
    """Per-frame attention never mixes frames; the joint one lets frame 0's tokens read frame 1's."""
    torch.manual_seed(0)
    attn = SpatialAttention(32, 2, joint=joint)
    x = torch.randn(2, 3, 5, 32, requires_grad=True)
    attn(x)[:, 0].sum().backward()
    reached = x.grad[:, 1:].abs().amax()
    assert (reached > 1e-4) if joint else (reached == 0)


def test_spatial_bias_is_one_learned_value_per_token_offset():
    """model.spatial_bias: each head's bias between tokens i and j of a 3 x 5 grid is its table's entry for their
    (row, column) offset, found here by a loop over the pairs; attention with it equals softmax(q k^T / sqrt(d) +
    bias) v in float64; it starts at 0 (the same function as without it), the table gets a gradient, and joint
    attention refuses it."""
    torch.manual_seed(0)
    grid = (3, 5)
    s = grid[0] * grid[1]
    offsets = grid_offsets(grid)
    seen = {}
    for i in range(s):
        for j in range(s):
            key = (j // grid[1] - i // grid[1], j % grid[1] - i % grid[1])
            assert seen.setdefault(key, int(offsets[i, j])) == int(offsets[i, j]), key
    assert len(set(seen.values())) == len(seen) == (2 * grid[0] - 1) * (2 * grid[1] - 1)

    plain = SpatialAttention(8, 2).double()
    biased = SpatialAttention(8, 2, bias_grid=grid).double()
    biased.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, s, 8, dtype=torch.float64)
    torch.testing.assert_close(biased(x), plain(x), rtol=1e-12, atol=1e-12)  # a zero table adds nothing
    with torch.no_grad():
        biased.rel_bias.normal_()
    q, k, v = biased.qkv(x).view(2, 3, s, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)  # (B, K, H, S, Dh) each
    table = biased.rel_bias
    bias = torch.stack([torch.stack([table[h, [[seen[(j // grid[1] - i // grid[1], j % grid[1] - i % grid[1])]
                                                for j in range(s)] for i in range(s)]] for h in range(2)])])[0]
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, dim=-1)
    reference = biased.proj((weights @ v).transpose(2, 3).reshape(2, 3, s, 8))
    out = biased(x)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert biased.rel_bias.grad.abs().amax() > 0
    with pytest.raises(ValueError, match="not supported"):
        SpatialAttention(8, 2, joint=True, bias_grid=grid)
    with pytest.raises(ValueError, match="tokens per frame"):
        biased(torch.randn(1, 2, s + 1, 8, dtype=torch.float64))
    model = VideoDiT(3, 12, 20, 4, width=16, heads=2, patch=4, spatial_bias=True)
    assert all(b.spatial.rel_bias.shape == (2, 5 * 9) for b in model.blocks)


@pytest.mark.parametrize("kernel", [3, 5])
def test_local_mix_reads_neighbouring_tokens_and_frames_only(kernel):
    """The local-mix MLP's output at (frame 2, row 2, column 2) depends on the tokens of frames 1..3 within
    kernel // 2 rows and columns of it, and on nothing further; against a loop over the 3 x k x k neighbourhood."""
    torch.manual_seed(0)
    grid = (6, 7)
    mlp = LocalMixMLP(8, 16, grid, kernel)
    x = torch.randn(2, 5, grid[0] * grid[1], 8, requires_grad=True)
    mlp(x)[:, 2, 2 * grid[1] + 2].sum().backward()
    reached = x.grad.abs().amax(dim=(0, 3)).reshape(5, *grid) > 0
    expected = torch.zeros(5, *grid, dtype=torch.bool)
    reach = kernel // 2
    for frame in (1, 2, 3):
        for row in range(2 - reach, 2 + reach + 1):
            for column in range(2 - reach, 2 + reach + 1):
                expected[frame, row, column] = True
    assert torch.equal(reached, expected)
    with pytest.raises(ValueError, match="odd"):
        LocalMixMLP(8, 16, grid, 4)
    # the model builds it in every block when asked, and the plain MLP otherwise
    assert all(isinstance(b.mlp, LocalMixMLP) for b in VideoDiT(3, 8, 8, 4, width=32, heads=1, local_mix=True).blocks)
    assert not any(isinstance(b.mlp, LocalMixMLP) for b in VideoDiT(3, 8, 8, 4, width=32, heads=1).blocks)


@pytest.mark.parametrize("kernel, with_bias", [((3, 3, 3), True), ((3, 5, 5), False), ((1, 3, 3), True)])
def test_depthwise_conv3d_matches_conv3d_forward_and_backward(kernel, with_bias):
    """depthwise_conv3d's own backward against F.conv3d's autograd in float64, on odd sizes, a channels-last view
    (as the local mix passes it) and a random output gradient; and a padding that would not keep the size is
    refused."""
    torch.manual_seed(1)
    b, c, frames, rows, cols = 3, 5, 7, 5, 6
    tokens = torch.randn(b, frames, rows, cols, c, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if with_bias else None
    padding = tuple(k // 2 for k in kernel)
    grad = torch.randn(b, c, frames, rows, cols, dtype=torch.float64)
    inputs = [tokens, weight] + ([bias] if with_bias else [])
    volume = tokens.permute(0, 4, 1, 2, 3)  # a view, channels last in memory
    ours = depthwise_conv3d(volume, weight, bias, padding)
    reference = F.conv3d(volume, weight, bias, padding=padding, groups=c)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # only the weight needs a gradient (a frozen input), and no gradient at all (sampling): both still agree
    frozen = volume.detach()
    got = torch.autograd.grad(depthwise_conv3d(frozen, weight, bias, padding), weight, grad)[0]
    want = torch.autograd.grad(F.conv3d(frozen, weight, bias, padding=padding, groups=c), weight, grad)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(depthwise_conv3d(volume, weight, bias, padding), reference.detach())
    with pytest.raises(ValueError, match="keeps the size"):
        depthwise_conv3d(volume, weight, bias, (0, 0, 0))
    # under CPU bf16 autocast it runs in fp32 (cpu_autocast_fp32): the fp32 result, and fp32 gradients
    leaf = volume.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv3d(leaf, weight.detach().float(), None, padding)
    out.sum().backward()
    assert out.dtype == torch.float32 and leaf.grad.dtype == torch.float32
    torch.testing.assert_close(out, F.conv3d(leaf.detach(), weight.detach().float(), None, padding=padding, groups=c))


class _OpDtypes(TorchDispatchMode):
    """The dtype of the first tensor argument of every aten op dispatched, by op name."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None:
            self.dtypes.setdefault(func.overloadpacket.__name__, set()).add(first.dtype)
        return func(*args, **(kwargs or {}))


def _dit_output_and_grads(model, x, t, observed, grad_out, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, observed)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [p.grad.double() for p in model.parameters()]


def test_cpu_bf16_autocast_runs_the_matmuls_in_bf16_and_attention_and_local_mix_in_fp32(monkeypatch):
    """run.precision=bf16 on a CPU: the linears run in bf16, the spatial attention and the local mix's depthwise
    convolution in fp32 (their bf16 CPU kernels are slower than fp32's). Output and every parameter gradient
    against the fp32 model (its error is ~1e-7, bf16's ~1e-2; the timestep embedding is fp32 by design, so there
    is no float64 model): within 2x the error of PyTorch's plain bf16 autocast of the same model."""
    torch.manual_seed(3)
    model = VideoDiT(4, 8, 8, 10, width=64, depth=2, heads=2, pos_embed="sincos", local_mix=True)
    with torch.no_grad():  # away from the zero init, so that every path carries signal
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 10, 4, 8, 8)
    t = torch.randint(0, 1000, (2, 10)).float()
    observed = torch.rand(2, 10) < 0.4
    grad_out = torch.randn_like(x)
    reference = _dit_output_and_grads(copy.deepcopy(model), x, t, observed, grad_out, autocast=False)
    recorder = _OpDtypes()
    with recorder:
        ours = _dit_output_and_grads(model, x, t, observed, grad_out, autocast=True)
    dtypes = recorder.dtypes
    attention = [name for name in dtypes if "scaled_dot_product" in name]
    assert attention and all(dtypes[name] == {torch.float32} for name in attention), {n: dtypes[n] for n in attention}
    assert dtypes["convolution"] == {torch.float32}
    assert torch.bfloat16 in dtypes["addmm"] | dtypes.get("mm", set())
    # PyTorch's own bf16: every op as autocast casts it, the depthwise convolution F.conv3d's
    monkeypatch.setattr(dit, "cpu_autocast_fp32", lambda fn, *tensors: fn(*tensors))
    monkeypatch.setattr(dit, "depthwise_conv3d",
                        lambda v, w, b, padding: F.conv3d(v, w, b, padding=padding, groups=w.shape[0]))
    plain = _dit_output_and_grads(model, x, t, observed, grad_out, autocast=True)

    def error(got):
        return max(((g - r).norm() / r.norm()).item() for g, r in zip(got, reference))

    assert error(ours) <= 2 * error(plain), (error(ours), error(plain))
    assert error(ours) < 0.05


def test_dit_rejects_bad_shapes():
    model = VideoDiT(4, 8, 8, 10, width=32, depth=1, heads=1)
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(1, 10, 3, 8, 8), torch.zeros(1, 10), torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        model(torch.randn(1, 10, 4, 8, 8), torch.zeros(1, 9), torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        VideoDiT(4, 9, 8, 10, patch=2)


def test_relative_bias_is_toeplitz():
    attn = TemporalAttention(16, 2, max_frames=5)
    torch.nn.init.normal_(attn.rel_bias)
    bias = attn.bias(5)
    assert bias.shape == (2, 5, 5)
    for i in range(5):
        for j in range(5):
            assert torch.equal(bias[:, i, j], attn.rel_bias[:, j - i + 4])


def test_preset_sizes_match_paper():
    from fastdiff.config import build_config

    sizes = {}
    for preset in ("small", "base"):
        m = build_config(preset).model
        model = VideoDiT(4, 8 if preset == "small" else 16, 8 if preset == "small" else 16,
                         10 if preset == "small" else 20, width=m.width, depth=m.depth, heads=m.heads, patch=m.patch)
        sizes[preset] = count_parameters(model)
    assert 6e6 < sizes["small"] < 10e6  # paper: Balls 8M
    assert 65e6 < sizes["base"] < 85e6  # paper: maze 78M


def test_pixel_conversions_roundtrip():
    frames = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(unit_to_pixels(pixels_to_unit(frames)), frames)
    assert torch.equal(PixelSpace().decode(PixelSpace().encode(frames)), frames)


def test_autoencoder_fits_and_freezes():
    import numpy as np

    rng = np.random.default_rng(0)
    frames = np.zeros((64, 16, 16, 3), np.uint8)
    for f in frames:  # one bright square per frame at a random place
        y, x = rng.integers(0, 12, 2)
        f[y : y + 4, x : x + 4] = rng.integers(100, 256, 3)
    ae = FrameAutoencoder(channels=4, factor=4, hidden=16)
    mse = ae.fit(frames, steps=300, batch=16, lr=1e-3, generator=torch.Generator().manual_seed(0),
                 device=torch.device("cpu"))
    baseline = float(pixels_to_unit(torch.from_numpy(frames)).var())
    assert mse < 0.75 * baseline
    assert all(not p.requires_grad for p in ae.parameters())
    z = ae.encode(torch.from_numpy(frames))
    assert z.shape == (64, 4, 4, 4)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1  # normalised latents
    assert ae.decode(z).dtype == torch.uint8


def test_pooled_colour_latent_is_a_colour_blind_code_plus_block_means():
    """autoencoder.colour=pooled: the learned channels cannot see colour (a red and a green ball in one place get
    one code), and the three appended channels are each block's mean RGB, so red against green costs in the latent
    what it costs in pixels."""
    import numpy as np

    from fastdiff.config import AutoencoderConfig
    from fastdiff.streams.balls import COLOR_RGB, render

    rng = np.random.default_rng(0)
    pos = rng.uniform(2, 8, size=(6, 2, 2))
    frames = {name: render(pos, np.broadcast_to(COLOR_RGB[c], (6, 2, 3)).astype(np.float64))
              for c, name in enumerate(("red", "yellow", "green"))}
    ae = FrameAutoencoder(channels=4, factor=4, hidden=8, pooled_colour=True)
    torch.manual_seed(0)
    with torch.no_grad():
        ae.shift.normal_()
        ae.scale.uniform_(0.5, 2.0)
        z = {name: ae.encode(torch.from_numpy(f)) for name, f in frames.items()}
    assert z["red"].shape == (6, 7, 8, 8)
    assert AutoencoderConfig(colour="pooled").latent_channels_and_factor() == (7, 4)
    assert torch.equal(z["red"][:, :4], z["green"][:, :4])  # colour-blind: the same code
    for name, f in frames.items():
        means = torch.nn.functional.avg_pool2d(pixels_to_unit(torch.from_numpy(f)), 4)
        raw = z[name][:, 4:] * ae.scale[4:, None, None] + ae.shift[4:, None, None]
        torch.testing.assert_close(raw, means, rtol=0, atol=1e-5)
    assert float((z["red"] - z["green"])[:, 4:].abs().amax()) > 0.5


def test_autoencoder_fit_runs_its_forward_in_the_autocast_dtype_and_keeps_fp32_statistics():
    """fit(autocast=bf16), as a bf16 run fits it: the training convolutions run in bf16, and the latents' shift and
    scale are computed in fp32 after it (they normalise every latent the DiT sees)."""
    import numpy as np

    frames = np.random.default_rng(1).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    for autocast, expected in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        ae = FrameAutoencoder(channels=4, factor=4, hidden=8)
        recorder = _OpDtypes()
        with recorder:
            ae.fit(frames, steps=2, batch=8, lr=1e-3, generator=torch.Generator().manual_seed(0),
                   device=torch.device("cpu"), autocast=autocast)
        assert expected in recorder.dtypes["convolution"]
        assert ae.shift.dtype == ae.scale.dtype == torch.float32
        z = ae.encode(torch.from_numpy(frames))  # normalised by the fit's statistics, to fp32's precision
        torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3, rtol=0)


def test_the_config_builds_the_pooled_colour_autoencoder_and_its_latent_shape():
    from fastdiff import build
    from fastdiff.config import build_config
    from fastdiff.memory import estimate

    cfg = build_config("tiny", None, {"autoencoder.latent": "ae", "autoencoder.colour": "pooled", "model.patch": "1"})
    ae = build.autoencoder(cfg.autoencoder, torch.device("cpu"))
    assert ae.pooled_colour and ae.channels == 7
    assert build.latent_shape(cfg.autoencoder, (32, 32)) == (7, 8, 8)
    z = ae.encode(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    assert z.shape == (2, 7, 8, 8)
    model = build.model(cfg.model, build.latent_shape(cfg.autoencoder, (32, 32)), 10, torch.device("cpu"))
    assert model(z[:1, None].expand(1, 10, 7, 8, 8).contiguous(), torch.zeros(1, 10, dtype=torch.long),
                 torch.zeros(1, 10, dtype=torch.bool)).shape == (1, 10, 7, 8, 8)
    assert estimate(cfg, (32, 32), 10, "cpu")["total"] > 0


@pytest.mark.parametrize("pooled", [False, True])
def test_reencoder_is_the_autoencoders_round_trip_through_uint8_frames(pooled):
    """reencoder(ae) maps latents (B, n, C, h, w) to encode(decode(.)) frame by frame, through the uint8 frames a
    video shows; disabled, there is nothing to call."""
    torch.manual_seed(0)
    ae = FrameAutoencoder(channels=4, factor=4, hidden=8, pooled_colour=pooled).eval()
    ae.scale.uniform_(0.5, 2.0)
    ae.shift.uniform_(-0.3, 0.3)
    latents = torch.randn(2, 3, ae.channels, 4, 5)
    out = reencoder(ae)(latents)
    assert out.shape == latents.shape
    for b in range(2):
        for n in range(3):
            frame = ae.decode(latents[b, n][None])
            assert frame.dtype == torch.uint8
            assert torch.allclose(out[b, n], ae.encode(frame)[0], atol=1e-6)
    assert not torch.allclose(out, latents, atol=1e-2)
    assert reencoder(ae, False) is None


def test_rollout_space_bounds_pixels_only_and_observes_through_the_round_trip_when_asked():
    """A rollout in pixel space clips its clean estimates to [-1, 1]; a learned latent has no bound. `observe` is
    the autoencoder's round trip exactly when diffusion.sample_reencode asks for it."""
    ae = FrameAutoencoder(channels=4, factor=4, hidden=8).eval()
    assert rollout_space(PixelSpace(), False) == {"clip_x0": 1.0, "observe": None}
    assert rollout_space(ae, False) == {"clip_x0": None, "observe": None}
    latents = torch.randn(1, 2, ae.channels, 4, 4)
    observe = rollout_space(ae, True)["observe"]
    assert torch.equal(observe(latents), reencoder(ae)(latents))


def test_pooled_colour_autoencoder_fits_colours():
    """The decoder takes colour from the block means: fitted on red and green squares, it reconstructs them far
    better than the mean frame does, and draws a square red or green as its input is, though the colour-blind
    learned channels of the two inputs are the same."""
    import numpy as np

    rng = np.random.default_rng(1)
    frames = np.zeros((64, 16, 16, 3), np.uint8)
    places = rng.integers(0, 12, (64, 2))
    for f, (y, x), c in zip(frames, places, rng.integers(0, 2, 64)):
        f[y : y + 4, x : x + 4, c] = 255
    torch.manual_seed(0)
    ae = FrameAutoencoder(channels=2, factor=4, hidden=16, pooled_colour=True)
    mse = ae.fit(frames, steps=300, batch=16, lr=1e-3, generator=torch.Generator().manual_seed(0),
                 device=torch.device("cpu"))
    baseline = float(pixels_to_unit(torch.from_numpy(frames)).var())
    assert mse < 0.75 * baseline, (mse, baseline)
    # One scale for the three colour channels: blue, never lit here, is not blown up to unit variance.
    assert float(ae.scale[-3]) == float(ae.scale[-1]) > 0.1
    red, green = np.zeros((2, 8, 16, 16, 3), np.uint8)
    for k, (y, x) in enumerate(places[:8]):
        red[k, y : y + 4, x : x + 4, 0] = 255
        green[k, y : y + 4, x : x + 4, 1] = 255
    lit = torch.from_numpy(red).amax(-1) > 0
    for square, sign in ((red, 1), (green, -1)):
        out = ae.decode(ae.encode(torch.from_numpy(square))).float()[lit]
        assert sign * float((out[:, 0] - out[:, 1]).mean()) > 64, out.mean(0)


def test_colour_gain_divides_the_colour_channels_scale_only():
    """autoencoder.colour_gain: the same fit (same seed, same frames) with gain 2 has half the colour channels'
    scale and the learned channels' scale unchanged, so a colour change is twice as far in the latent; the gain
    is refused without pooled colour channels."""
    import numpy as np

    frames = np.random.default_rng(2).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    scales = {}
    for gain in (1.0, 2.0):
        torch.manual_seed(0)
        ae = FrameAutoencoder(channels=2, factor=4, hidden=8, pooled_colour=True, colour_gain=gain)
        ae.fit(frames, steps=2, batch=8, lr=1e-3, generator=torch.Generator().manual_seed(0),
               device=torch.device("cpu"))
        scales[gain] = ae.scale.clone()
    torch.testing.assert_close(scales[2.0][:2], scales[1.0][:2], rtol=0, atol=0)
    torch.testing.assert_close(scales[2.0][2:], scales[1.0][2:] / 2, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="pooled_colour"):
        FrameAutoencoder(channels=2, factor=4, hidden=8, colour_gain=2.0)


def test_autoencoder_reconstructs_balls_with_the_default_settings():
    """The default fit schedule (lr, warm-up, clipping) on real stream frames must beat "predict the mean
    frame" by far: ~90% of a balls frame is black, and an unstable fit settles on the mean colour (seen
    before the warm-up was added: MSE 0.16, the baseline's own value, and samples of brown squares).
    Half-width encoder and 200 steps keep it quick (measured 0.049 against a baseline of 0.105, i.e. 0.46);
    the preset's full-width 400-step fit reaches 0.0025."""
    from fastdiff.config import AutoencoderConfig
    from fastdiff.streams import make_stream

    cfg = AutoencoderConfig()
    frames = make_stream("balls-o", total_frames=2000).read(256)
    torch.manual_seed(0)
    ae = FrameAutoencoder(cfg.channels, cfg.factor, hidden=16)
    mse = ae.fit(frames, steps=200, batch=16, lr=cfg.lr, generator=torch.Generator().manual_seed(0),
                 device=torch.device("cpu"))
    unit = pixels_to_unit(torch.from_numpy(frames))
    mean_frame_mse = float((unit - unit.mean(dim=0)).pow(2).mean())
    assert mse < 0.6 * mean_frame_mse, (mse, mean_frame_mse)


def test_last_observed_against_a_loop():
    """Any observed pattern, not only prefixes: each frame gets the latest observed frame at or before it, or
    zeros before the first one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 2, 3, 3, generator=g)
    observed = torch.rand(5, 7, generator=g) < 0.4
    observed[0] = False  # a row with nothing observed
    expected = torch.zeros_like(x)
    for b in range(5):
        latest = None
        for k in range(7):
            if observed[b, k]:
                latest = x[b, k]
            if latest is not None:
                expected[b, k] = latest
    assert torch.equal(last_observed(x, observed), expected)


def test_context_skip_needs_x0_prediction():
    from fastdiff.config import ConfigError, build_config

    build_config("tiny", None, {"model.context_skip": "true", "diffusion.prediction": "x0"})
    with pytest.raises(ConfigError, match="diffusion.prediction=x0"):
        build_config("tiny", None, {"model.context_skip": "true", "diffusion.prediction": "eps"})


def test_low_noise_skip_passes_a_clean_input_through_and_leaves_high_noise_to_the_network():
    """model.low_noise_skip s_d: x0 = c_skip x_t / alpha + c_out F with r = sigma / alpha, c_skip = s_d^2 /
    (r^2 + s_d^2), c_out = r / sqrt(r^2 + s_d^2). Checked against those formulas in float64 with a network whose
    output F is known, at levels from clean to pure noise."""
    from fastdiff.diffusion import Schedule

    schedule = Schedule.make("linear", 1000)
    model = VideoDiT(3, 8, 8, 4, width=32, depth=1, heads=1, patch=4, low_noise_skip=0.1,
                     schedule=(schedule.alpha, schedule.sigma)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([[0, 10, 50, 150], [400, 700, 999, 3]])
    observed = torch.zeros(2, 4, dtype=torch.bool)
    with torch.no_grad():
        plain = VideoDiT(3, 8, 8, 4, width=32, depth=1, heads=1, patch=4)
        plain.load_state_dict(model.state_dict())
        for p in plain.out.parameters():
            torch.nn.init.normal_(p, std=0.1)
        model.out.load_state_dict(plain.out.state_dict())
        network = plain(x, t.float(), observed).double()
        got = model(x, t.float(), observed).double()
    a, s = schedule.alpha.double()[t], schedule.sigma.double()[t]
    r = s / a
    c_skip, c_out = 0.01 / (r**2 + 0.01), r / (r**2 + 0.01).sqrt()
    expect = (c_skip / a)[..., None, None, None] * x.double() + c_out[..., None, None, None] * network
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert c_skip[0, 1] > 0.8 and c_skip[0, 3] < 0.05 and c_out[1, 2] > 0.9999  # skip low, network high


def test_a_run_with_the_low_noise_skip_trains_and_loads_with_it(tmp_path):
    """The trainer and load_run both build the skip from the run's own schedule (here cosine)."""
    from fastdiff.build import model as build_model
    from fastdiff.config import build_config
    from fastdiff.diffusion import Schedule
    from fastdiff.sampling import load_run
    from fastdiff.train import OnlineTrainer, write_config

    cfg = build_config("tiny", None, {
        "model.width": "32", "model.depth": "1", "model.heads": "1", "model.low_noise_skip": "0.2",
        "diffusion.schedule": "cosine", "run.frames": "24", "run.threads": "1", "run.stream_frames": "3000",
        "run.final_clips": "0", "run.sample_every": "0", "run.progress": "false", "run.out": str(tmp_path)})
    write_config(cfg, tmp_path)
    OnlineTrainer(cfg, tmp_path, log=lambda *_: None).train()
    run = load_run(tmp_path, device="cpu")
    cosine = Schedule.make("cosine", 1000)
    assert run.model.low_noise_skip == 0.2
    torch.testing.assert_close(run.model.skip_output, (cosine.sigma / cosine.alpha) / (
        (cosine.sigma / cosine.alpha) ** 2 + 0.04).sqrt())
    with pytest.raises(ValueError, match="diffusion config"):
        build_model(cfg.model, (3, 32, 32), 10, "cpu")


def test_low_noise_skip_needs_x0_prediction():
    from fastdiff.config import ConfigError, build_config

    build_config("tiny", None, {"model.low_noise_skip": "0.1"})
    with pytest.raises(ConfigError, match="diffusion.prediction=x0"):
        build_config("tiny", None, {"model.low_noise_skip": "0.1", "diffusion.prediction": "v"})
    with pytest.raises(ConfigError, match="low_noise_skip"):
        build_config("tiny", None, {"model.low_noise_skip": "-1"})
    with pytest.raises(ConfigError, match="pick one"):
        build_config("tiny", None, {"model.low_noise_skip": "0.1", "model.context_skip": "true"})


def test_untrained_pixel_head_passes_the_patch_output_through():
    """model.pixel_head starts as the identity: the same weights with and without it give the same output."""
    torch.manual_seed(0)
    plain = VideoDiT(3, 8, 12, 4, width=32, depth=1, heads=1, patch=4)
    headed = VideoDiT(3, 8, 12, 4, width=32, depth=1, heads=1, patch=4, pixel_head=6)
    for p in plain.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    missing = headed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("head_") for key in missing)
    x, t = torch.randn(2, 4, 3, 8, 12), torch.randint(0, 1000, (2, 4)).float()
    observed = torch.tensor([[True, True, False, False]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(headed(x, t, observed), plain(x, t, observed), rtol=0, atol=0)


def test_pixel_head_refines_each_pixel_from_its_neighbourhood_at_the_frames_level():
    """VideoDiT.refine: a pixel of the input reaches the output within two pixels (two 3x3 convolutions) in its own
    frame only, and the frame's conditioning (its timestep) changes what the head adds."""
    torch.manual_seed(0)
    model = VideoDiT(3, 8, 12, 3, width=32, depth=1, heads=1, patch=4, pixel_head=5)
    for layer in (model.head_film, model.head_out):
        torch.nn.init.normal_(layer.weight, std=0.3)
    out, inputs, cond = torch.randn(1, 3, 3, 8, 12), torch.randn(1, 3, 4, 8, 12), torch.randn(1, 3, 32)
    moved = inputs.clone()
    moved[0, 1, 2, 4, 6] += 1.0
    with torch.no_grad():
        changed = (model.refine(out, moved, cond) - model.refine(out, inputs, cond)).abs().sum(2)[0]  # (K, H, W)
        assert changed[0].sum() == 0 and changed[2].sum() == 0
        rows, cols = torch.nonzero(changed[1]).unbind(1)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 6, 4, 8)
        other = cond.clone()
        other[0, 1] += 1.0
        by_level = (model.refine(out, inputs, other) - model.refine(out, inputs, cond)).abs().flatten(2).sum(-1)[0]
    assert by_level[1] > 0 and by_level[0] == 0 and by_level[2] == 0


def test_a_run_with_the_pixel_head_trains_it_and_loads_with_it(tmp_path):
    from fastdiff.config import ConfigError, build_config
    from fastdiff.sampling import load_run
    from fastdiff.train import OnlineTrainer, write_config

    cfg = build_config("tiny", None, {
        "model.width": "32", "model.depth": "1", "model.heads": "1", "model.pixel_head": "4", "optim.warmup": "0",
        "run.frames": "24", "run.threads": "1", "run.stream_frames": "3000", "run.final_clips": "0",
        "run.sample_every": "0", "run.progress": "false", "run.out": str(tmp_path)})
    write_config(cfg, tmp_path)
    trainer = OnlineTrainer(cfg, tmp_path, log=lambda *_: None)
    trainer.train()
    assert trainer.step.model.head_out.weight.abs().sum() > 0  # trained away from its zero start
    run = load_run(tmp_path, device="cpu")
    assert run.model.head_in.out_channels == 4
    torch.testing.assert_close(run.model.head_out.weight, trainer.step.ema.head_out.weight)
    with pytest.raises(ConfigError, match="pixel_head"):
        build_config("tiny", None, {"model.pixel_head": "-2"})


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_overlapping_patches_read_and_draw_across_patch_edges(patch):
    """With model.overlap a token reads its patch and half a patch around it, and draws there: a pixel at the corner
    of a patch reaches the tokens of the patches that meet at that corner (and only those), and one token's output
    reaches into its neighbours' pixels. Without it, each token reads and draws its own patch alone."""
    torch.manual_seed(0)
    h, w = 4 * patch, 6 * patch  # not square: rows and columns must not be swapped
    for overlap in (False, True):
        model = VideoDiT(3, h, w, 2, width=64, depth=1, heads=2, patch=patch, overlap=overlap)
        x = torch.randn(1, 2, 4, h, w)
        moved = x.clone()
        moved[0, 1, :, patch - 1, patch - 1] += 1.0  # the corner pixel shared by patches (0, 0), (0, 1), (1, 0), (1, 1)
        changed = (model.to_tokens(moved) - model.to_tokens(x)).abs().sum(-1)[0]  # (K, S)
        assert changed[0].sum() == 0  # the other frame is untouched
        reached = set(map(tuple, torch.nonzero(changed[1].view(4, 6)).tolist()))
        assert reached == ({(0, 0), (0, 1), (1, 0), (1, 1)} if overlap else {(0, 0)}), (overlap, reached)

        torch.nn.init.normal_(model.out.weight)
        tokens = torch.zeros(1, 2, 24, 64)
        tokens[0, 1, 6 + 1] = 1.0  # the token of patch (1, 1)
        drawn = model.to_frames(tokens) - model.to_frames(torch.zeros_like(tokens))
        assert drawn[0, 0].abs().sum() == 0
        rows, cols = torch.nonzero(drawn[0, 1].abs().sum(0)).unbind(1)
        pad = (patch + 1) // 2 if overlap else 0
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (patch - pad, 2 * patch - 1 + pad,
                                                                    patch - pad, 2 * patch - 1 + pad)


def test_overlapping_patches_start_at_zero():
    model = VideoDiT(3, 8, 12, 4, width=64, depth=1, heads=2, patch=4, overlap=True)
    out = model(torch.randn(2, 4, 3, 8, 12), torch.rand(2, 4) * 1000, torch.tensor([[True, True, False, False]] * 2))
    assert out.shape == (2, 4, 3, 8, 12) and torch.count_nonzero(out) == 0


def test_self_conditioned_dit_reads_its_estimate_and_refuses_a_stray_one():
    """model with self_condition: no estimate is the zero estimate; an estimate in one frame changes the output
    (the embedding reads it); a wrongly shaped one is refused. A model without it refuses any estimate."""
    torch.manual_seed(0)
    model = VideoDiT(3, 8, 12, 4, width=32, depth=1, heads=1, patch=4, self_condition=True)
    assert model.embed.in_features == (2 * 3 + 1) * 16
    for p in model.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 4, 3, 8, 12), torch.randint(0, 1000, (2, 4)).float()
    observed = torch.tensor([[True, True, False, False]] * 2)
    estimate = torch.zeros_like(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, observed), model(x, t, observed, estimate), rtol=0, atol=0)
        estimate[:, 2] = torch.randn(2, 3, 8, 12)
        assert not torch.allclose(model(x, t, observed, estimate), model(x, t, observed))
        with pytest.raises(ValueError, match="estimate must be shaped"):
            model(x, t, observed, estimate[:, :3])
        plain = VideoDiT(3, 8, 12, 4, width=32, depth=1, heads=1, patch=4)
        with pytest.raises(ValueError, match="built without self_condition"):
            plain(x, t, observed, estimate)


def test_a_self_conditioned_run_trains_samples_and_loads_with_it(tmp_path):
    """diffusion.self_condition=true end to end: the model is built to read the estimate, each step calls it twice,
    the run reloads with it and samples; gen-distill refuses it."""
    from fastdiff.config import ConfigError, build_config
    from fastdiff.diffusion import sample_window
    from fastdiff.sampling import load_run
    from fastdiff.train import OnlineTrainer, write_config

    cfg = build_config("tiny", None, {
        "model.width": "32", "model.depth": "1", "model.heads": "1", "diffusion.self_condition": "true",
        "optim.warmup": "0", "run.frames": "16", "run.threads": "1", "run.stream_frames": "3000",
        "run.final_clips": "0", "run.sample_every": "0", "run.progress": "false", "run.out": str(tmp_path)})
    write_config(cfg, tmp_path)
    trainer = OnlineTrainer(cfg, tmp_path, log=lambda *_: None)
    calls = []  # how many inputs each forward call was given

    def count_inputs(module, args, kwargs, out):
        calls.append(len(args) + len(kwargs))

    trainer.step.model.register_forward_hook(count_inputs, with_kwargs=True)
    trainer.train()
    assert calls and set(calls) == {3, 4} and len(calls) % 2 == 0  # estimate pass (3 args), graded pass (4)
    run = load_run(tmp_path, device="cpu")
    assert run.model.self_condition and run.model.embed.in_features == 7 * 16
    clip = torch.rand(1, run.window, 3, run.model.grid[0] * 4, run.model.grid[1] * 4)
    observed = (torch.arange(run.window) < run.window // 2)[None]
    calls.clear()
    run.model.register_forward_hook(count_inputs, with_kwargs=True)
    out = sample_window(run.model, clip, observed, run.schedule, run.cfg.diffusion, generator=torch.Generator())
    assert out.shape == clip.shape and torch.isfinite(out).all()
    assert set(calls) == {4}  # the sampler hands every call its estimate
    with pytest.raises(ConfigError, match="self_condition"):
        build_config("tiny", None, {"diffusion.self_condition": "true", "replay.strategy": "gen-distill"})
