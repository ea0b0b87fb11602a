"""Video DiT: factorised spatial + temporal attention over latent clips, one timestep per frame.

Input (B, K, C, H, W) noisy clip, timesteps (B, K), observed mask (B, K) -> prediction (B, K, C, H, W).
Tokens are (B, K, S, D) with S = patches per frame. Each block: spatial attention over S for every
(b, k) (with model.spatial_bias, a learned bias per (row, column) offset), temporal attention over K for
every (b, s) with a learned relative-position bias (heads, K, K), then an MLP; each sub-layer is modulated per
frame by adaLN-zero from the frame's conditioning vector (timestep embedding + observed-frame embedding).
Observed frames also carry an indicator channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdiff import ops


def sincos(positions: torch.Tensor, width: int) -> torch.Tensor:
    """The fixed sine-cosine embedding (Vaswani et al. 2017) of positions (N,): (N, width), the sines of the
    width // 2 geometric frequencies then their cosines, zero-padded to width."""
    half = width // 2
    freqs = 1.0 / 10_000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64).reshape(-1, 1) * freqs
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, width - table.shape[1])).float()


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine position embedding of DiT (Peebles & Xie 2023): half the channels encode the row,
    half the column, at geometric frequencies. (gh * gw, width)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    axis = 2 * (width // 4)  # channels per axis: width // 4 frequencies, a sine and a cosine each
    table = torch.cat([sincos(rows, axis), sincos(cols, axis)], dim=1)
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))


def overlap_margin(patch: int) -> int:
    """Pixels beyond its own patch, on every side, that a token reads and draws with model.overlap: half a patch
    (rounded up, so that patch 1 still reaches its neighbours)."""
    return (patch + 1) // 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, any shape -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def mlp_activation() -> nn.Module:
    """The blocks' MLP activation: DiT's tanh-approximated GELU, with which every row of the learning study was
    trained. The exact (erf) GELU differs from it by at most 5e-4 and has the faster CPU kernel (3.5x forward, 2.3x
    backward at `tiny`'s training size, about 4% of a step), but two seeds with each could not tell the two apart
    on held-out numbers (profiles/learning/README.md, rows AC0 and AC1), so it waits for a study with more seeds."""
    return nn.GELU(approximate="tanh")


def grid_offsets(grid: tuple[int, int]) -> torch.Tensor:
    """(S, S) index of the (row, column) offset from token i to token j of a grid, into a table of the
    (2 rows - 1) * (2 columns - 1) offsets: two pairs of tokens get the same index exactly when they sit at the
    same offset."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[None, :] - rows[:, None] + grid[0] - 1  # shifted to >= 0
    d_col = cols[None, :] - cols[:, None] + grid[1] - 1
    return d_row * (2 * grid[1] - 1) + d_col


def cpu_autocast_fp32(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), in fp32 with autocast off where a CPU bf16 autocast region is on; elsewhere fn(*tensors).

    Why: on a CPU under bf16 autocast the matmuls took 0.37x their fp32 time (AVX512-BF16, 2 threads), but
    PyTorch's bf16 CPU kernels for the spatial attention's backward and the depthwise convolution's backward take
    3-4x their fp32 time at `tiny-latent`'s training size, more than the matmuls save (2 threads). So on a CPU
    only the matmuls run in bf16."""
    if tensors[0].device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return fn(*tensors)
    with torch.autocast("cpu", enabled=False):
        return fn(*(t if t is None else t.float() for t in tensors))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with an optional additive bias, as cpu_autocast_fp32 calls it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class SpatialAttention(nn.Module):
    """Attention over the S tokens of every frame; with `joint`, over all K * S tokens of the clip at once, so that a
    token reaches another frame's tokens at other places in one hop (a moving ball), at (K * S)^2 cost.

    With `bias_grid` (model.spatial_bias), each head adds a learned bias for every (row, column) offset between
    two tokens of the frame (Swin's relative position bias), as temporal attention has one for frame offsets. Why:
    the sin-cos positions are added once, at the input, so a head can prefer the tokens next to its own (where a
    ball about to collide with this one is) only through what its queries and keys learn to carry; the bias
    gives every head that preference directly, the same at every place of the frame. It starts at 0, so a model
    built with it computes the same function as one without until it trains. On a GPU, SDPA cannot take an
    additive mask into its flash kernel and runs its memory-efficient one instead (its cost there is not measured
    yet). On `tiny` (two seeds) it did not keep the balls apart where they meet any better than the
    recipe's own draws do, at 7-10% more CPU a step, so it is off there (profiles/learning/README.md, AD1)."""

    def __init__(self, width: int, heads: int, joint: bool = False, bias_grid: tuple[int, int] | None = None):
        super().__init__()
        if joint and bias_grid is not None:
            raise ValueError("spatial attention bias with joint attention is not supported because the bias is "
                             "defined between tokens of one frame, and joint attention spans the whole clip")
        self.heads = heads
        self.joint = joint
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        if bias_grid is None:
            self.rel_bias = None
        else:
            self.rel_bias = nn.Parameter(torch.zeros(heads, (2 * bias_grid[0] - 1) * (2 * bias_grid[1] - 1)))
            self.register_buffer("offsets", grid_offsets(bias_grid), persistent=False)

    def bias(self) -> torch.Tensor | None:
        """(H, S, S) additive attention bias, or None without model.spatial_bias."""
        return None if self.rel_bias is None else self.rel_bias[:, self.offsets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, D)
        b, k, s, d = x.shape
        groups, length = (b, k * s) if self.joint else (b * k, s)
        qkv = self.qkv(x).view(groups, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias()
        if bias is not None:
            if bias.shape[-1] != s:
                raise ValueError(f"spatial attention bias built for {bias.shape[-1]} tokens per frame, got {s}")
            bias = bias.to(qkv.dtype)
        out = cpu_autocast_fp32(attend, qkv[0], qkv[1], qkv[2], bias)  # (groups, H, length, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, k, s, d))


class TemporalAttention(nn.Module):
    """Attention over the K frames of every spatial location, with a relative-position bias.

    q, k and v reach the kernel as strided views of the fused qkv projection (no copies)."""

    def __init__(self, width: int, heads: int, max_frames: int):
        super().__init__()
        self.heads = heads
        self.max_frames = max_frames
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * max_frames - 1))

    def bias(self, frames: int) -> torch.Tensor:
        idx = torch.arange(frames, device=self.rel_bias.device)
        offsets = idx[None, :] - idx[:, None] + self.max_frames - 1  # j - i, shifted to >= 0
        return self.rel_bias[:, offsets]  # (H, K, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, D)
        b, k, s, d = x.shape
        if k > self.max_frames:
            raise ValueError(f"temporal attention built for {self.max_frames} frames, got {k}")
        # One transpose of the D-wide activations so that each (b, s) sequence is a single stride.
        qkv = self.qkv(x.transpose(1, 2)).view(b * s, k, 3, self.heads, d // self.heads)
        out = ops.temporal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=self.bias(k).to(qkv.dtype))
        return self.proj(out.reshape(b, s, k, d).transpose(1, 2))


class _DepthwiseConv3d(torch.autograd.Function):
    """A stride-1 depthwise 3-D convolution whose backward is two more convolutions (see depthwise_conv3d)."""

    @staticmethod
    def forward(ctx, volume, weight, bias, padding):
        ctx.save_for_backward(volume, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(volume, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        volume, weight = ctx.saved_tensors
        pad = ctx.padding
        b, d = volume.shape[:2]
        grad_volume = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # a same-size correlation's input gradient: the flipped kernel, same padding
            grad_volume = F.conv3d(grad, weight.flip(2, 3, 4), padding=pad, groups=d)
        if ctx.needs_input_grad[1]:
            # weight[c] correlates channel c of every sample with its output gradient: one group per (sample,
            # channel), the padded input the image and the gradient the kernel, summed over the samples
            padded = F.pad(volume, (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]))
            per_sample = F.conv3d(padded.reshape(1, b * d, *padded.shape[2:]),
                                  grad.reshape(b * d, 1, *grad.shape[2:]), groups=b * d)
            grad_weight = per_sample.view(b, d, *weight.shape[2:]).sum(0)[:, None].to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4)).to(weight.dtype)
        return grad_volume, grad_weight, grad_bias, None


def depthwise_conv3d(volume: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int, int]) -> torch.Tensor:
    """F.conv3d(volume, weight, bias, padding=padding, groups=channels) at stride 1, with output the size of the
    input (odd kernel, padding = kernel // 2).

    Why not F.conv3d alone: on a CPU, PyTorch's backward of a depthwise 3-D convolution is its slow generic kernel,
    more than 10 times its forward for `tiny`'s local mix (bench/bench_local_mix.py); written as two more
    convolutions, forward + backward is 2-2.4 times faster at 2 windows (about 8% of a `tiny` training step at one
    thread; at 24 windows only 6%, as the weight gradient's grouped convolution grows with the batch).
    Elsewhere (CUDA: cuDNN's own depthwise backward; no gradient needed) this is F.conv3d. Under CPU bf16 autocast
    it runs in fp32 (cpu_autocast_fp32)."""
    if any(2 * p + 1 != k for p, k in zip(padding, weight.shape[2:])):
        raise ValueError(f"depthwise_conv3d keeps the size: padding {padding} must be kernel "
                         f"{tuple(weight.shape[2:])} // 2")
    plain = (volume.device.type != "cpu" or not torch.is_grad_enabled()
             or not (volume.requires_grad or weight.requires_grad))
    if plain:
        return F.conv3d(volume, weight, bias, padding=padding, groups=weight.shape[0])
    return cpu_autocast_fp32(lambda v, w, b: _DepthwiseConv3d.apply(v, w, b, tuple(padding)), volume, weight, bias)


class LocalMixMLP(nn.Module):
    """The block's MLP, reading its input plus a depthwise convolution of it over (frame, row, column): 3 frames
    by `kernel` x `kernel` tokens (3 in `tiny`; 5 was measured and not adopted, profiles/learning/README.md).

    Why: a ball that moves from one patch to the next is read, in the factorised attention, by a spatial hop and a
    temporal hop in turn; the convolution gives every token its neighbours in the frames before and after directly,
    the locality a convolutional U-Net (the paper's model) has from the start. It runs on the block's width, not
    the MLP's hidden width, and on the tokens' own memory layout (channels last, no copy): on a CPU that measured
    3.7 ms against 47 ms on the hidden width in the default layout (forward + backward, one thread), and
    depthwise_conv3d's backward takes it from 3.6 ms to 1.8 ms (profiles/cpu/bench_local_mix.json)."""

    def __init__(self, width: int, hidden: int, grid: tuple[int, int], kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"local mix kernel must be odd and positive (a centred window), got {kernel}")
        self.grid = grid
        self.mix = nn.Conv3d(width, width, (3, kernel, kernel), padding=(1, kernel // 2, kernel // 2), groups=width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = mlp_activation()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, D)
        b, k, s, d = x.shape
        volume = x.reshape(b, k, *self.grid, d).permute(0, 4, 1, 2, 3)  # (B, D, K, rows, columns), a view
        mixed = depthwise_conv3d(volume, self.mix.weight, self.mix.bias, self.mix.padding)
        mixed = mixed.permute(0, 2, 3, 4, 1).reshape(b, k, s, d)
        return self.fc2(self.act(self.fc1(x + mixed)))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, max_frames: int, mlp_ratio: float, joint: bool = False,
                 local_mix_grid: tuple[int, int] | None = None, local_mix_kernel: int = 3,
                 spatial_bias_grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.spatial = SpatialAttention(width, heads, joint, spatial_bias_grid)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.temporal = TemporalAttention(width, heads, max_frames)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        if local_mix_grid is None:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), mlp_activation(), nn.Linear(hidden, width))
        else:
            self.mlp = LocalMixMLP(width, hidden, local_mix_grid, local_mix_kernel)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # cond (B, K, D) -> nine (B, K, 1, D) modulation tensors, one set per frame.
        mods = self.ada(cond)[:, :, None].chunk(9, dim=-1)
        # ops.adaln_modulate(x, shift, scale, eps) = modulate(norm(x), shift, scale), fused in one pass.
        x = x + mods[2] * self.spatial(ops.adaln_modulate(x, mods[0], mods[1], self.norm1.eps))
        x = x + mods[5] * self.temporal(ops.adaln_modulate(x, mods[3], mods[4], self.norm2.eps))
        return x + mods[8] * self.mlp(ops.adaln_modulate(x, mods[6], mods[7], self.norm3.eps))


class VideoDiT(nn.Module):
    def __init__(self, channels: int, height: int, width_px: int, max_frames: int, *, width: int = 64,
                 depth: int = 4, heads: int = 4, patch: int = 1, mlp_ratio: float = 4.0,
                 checkpoint_activations: bool = False, pos_embed: str = "learned", context_skip: bool = False,
                 overlap: bool = False, frame_pos: bool = False, joint_attention: bool = False,
                 local_mix: bool = False, local_mix_kernel: int = 3, spatial_bias: bool = False,
                 low_noise_skip: float = 0.0, pixel_head: int = 0, self_condition: bool = False,
                 schedule: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if height % patch or width_px % patch:
            raise ValueError(f"frame {height}x{width_px} is not divisible by patch {patch}")
        self.channels, self.patch, self.max_frames = channels, patch, max_frames
        self.grid = (height // patch, width_px // patch)
        self.checkpoint_activations = checkpoint_activations
        self.context_skip = context_skip
        # self_condition: the input also carries an estimate of the clean frames (C more channels; zeros where there
        # is none), see fastdiff/diffusion.py masked_diffusion_loss and ddim_sample.
        self.self_condition = self_condition
        inputs = (2 if self_condition else 1) * channels + 1  # +1: the observed-frame indicator channel
        # overlap: each token reads, and draws, its patch and half a patch around it (a strided conv in, its transpose
        # out), so a ball that straddles a patch edge is seen by the tokens on both sides and drawn by them together,
        # not as blocks that each token fills alone and that need not meet.
        self.overlap = overlap
        if overlap:
            pad = overlap_margin(patch)
            self.embed = nn.Conv2d(inputs, width, patch + 2 * pad, stride=patch, padding=pad)
        else:
            self.embed = nn.Linear(inputs * patch * patch, width)
        if pos_embed == "sincos":  # fixed: where every token sits is known from the first step
            self.register_buffer("pos", sincos_2d(self.grid, width), persistent=False)
        elif pos_embed == "learned":
            self.pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], width) * 0.02)
        else:
            raise ValueError(f"pos_embed {pos_embed!r} is not one of learned, sincos")
        # frame_pos: every token also carries its frame's index in the window, so that what temporal attention reads
        # from a frame says which frame it came from (the relative-position bias only weighs frames, and starts flat):
        # a ball's velocity is a difference between ordered frames.
        if frame_pos:
            table = sincos(torch.arange(max_frames), width)[:, None]  # (K, 1, D)
            self.register_buffer("frame_pos", table, persistent=False)
        else:
            self.frame_pos = None
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.observed_embed = nn.Embedding(2, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, max_frames, mlp_ratio, joint_attention,
                                             self.grid if local_mix else None, local_mix_kernel,
                                             self.grid if spatial_bias else None)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        if overlap:
            self.out = nn.ConvTranspose2d(width, channels, patch + 2 * pad, stride=patch, padding=pad)
        else:
            self.out = nn.Linear(width, channels * patch * patch)
        # pixel_head > 0: refine the patch output at pixel resolution (see refine); its last convolution starts at
        # zero, so that an untrained head passes the patch output through unchanged.
        if pixel_head > 0:
            self.head_in = nn.Conv2d(channels + inputs, pixel_head, 3, padding=1)
            self.head_film = nn.Linear(width, 2 * pixel_head)
            self.head_out = nn.Conv2d(pixel_head, channels, 3, padding=1)
            zeroed = (self.final_ada[1], self.out, self.head_film, self.head_out)
        else:
            self.head_in = None
            zeroed = (self.final_ada[1], self.out)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # low_noise_skip s_d > 0 (an x0 model): x0 = c_skip x_t / alpha + c_out F, with the noise-to-signal ratio
        # r = sigma / alpha of each frame's level, c_skip = s_d^2 / (r^2 + s_d^2) and c_out = r / sqrt(r^2 + s_d^2)
        # (EDM's skip, with c_out -> 1 at high noise so that there the network predicts x0 as before). Where r is
        # well below s_d the input passes through and the network adds a correction; above it, it draws x0 alone.
        # Why: an x0 network redraws every pixel also from an almost clean input, and draws two touching balls of
        # one colour as one from it (profiles/learning/README.md, "What the denoiser cannot draw").
        self.low_noise_skip = low_noise_skip
        if low_noise_skip > 0:
            if schedule is None or context_skip:
                raise ValueError("low_noise_skip needs the schedule's (alpha, sigma) tables, and no context_skip")
            alpha, sigma = (table.double() for table in schedule)
            ratio = sigma / alpha
            c_skip = low_noise_skip**2 / (ratio**2 + low_noise_skip**2)
            self.register_buffer("skip_input", (c_skip / alpha).float(), persistent=False)
            self.register_buffer("skip_output", (ratio / (ratio**2 + low_noise_skip**2).sqrt()).float(),
                                 persistent=False)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The weights of the transformer blocks' linear layers (attention projections, MLP, adaLN): what
        optim.name=muon steps with Muon. The patch embedding, output layer, timestep MLP, biases, convolutions and
        the attention bias tables stay on AdamW: Muon is for the matrices between hidden states."""
        return [m.weight for block in self.blocks for m in block.modules() if isinstance(m, nn.Linear)]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, C, H, W) -> (B, K, S, C*p*p)
        b, k, c, _, _ = x.shape
        p, (gh, gw) = self.patch, self.grid
        x = x.reshape(b, k, c, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, k, gh * gw, c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, C*p*p) -> (B, K, C, H, W)
        b, k = x.shape[:2]
        p, (gh, gw), c = self.patch, self.grid, self.channels
        x = x.reshape(b, k, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, k, c, gh * p, gw * p)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, inputs, H, W) -> (B, K, S, D)
        if not self.overlap:
            return self.embed(self.patchify(x))
        b, k = x.shape[:2]
        return self.embed(x.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, k, -1, self.embed.out_channels)

    def to_frames(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, K, S, D) -> (B, K, C, H, W)
        if not self.overlap:
            return self.unpatchify(self.out(tokens))
        b, k, _, d = tokens.shape
        out = self.out(tokens.reshape(b * k, *self.grid, d).permute(0, 3, 1, 2))
        return out.view(b, k, *out.shape[1:])

    def refine(self, out: torch.Tensor, inputs: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The pixel head: out (B, K, C, H, W) plus two 3x3 convolutions of [out, inputs] (inputs: the noisy frames,
        the self-conditioning estimate if any and the observed indicator, (B, K, inputs, H, W)), whose hidden
        channels are scaled and shifted per frame by the timestep conditioning cond (B, K, D), so that the head knows
        how far to trust the noisy input."""
        b, k = out.shape[:2]
        hidden = self.head_in(torch.cat([out, inputs], dim=2).flatten(0, 1))  # (B*K, P, H, W)
        scale, shift = self.head_film(cond).flatten(0, 1)[:, :, None, None].chunk(2, dim=1)
        hidden = F.silu(hidden * (1 + scale) + shift)
        return out + self.head_out(hidden).view_as(out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, observed: torch.Tensor,
                estimate: torch.Tensor | None = None) -> torch.Tensor:
        """x0 (or eps, v) of noisy frames x (B, K, C, H, W) at levels t (B, K), `observed` (B, K) marking the frames
        given clean. `estimate` (like x): the self-conditioning input of a model built with self_condition (None:
        zeros, the model's prediction without one); refused by a model without it."""
        b, k, c, h, w = x.shape
        if c != self.channels or (h // self.patch, w // self.patch) != self.grid:
            raise ValueError(f"expected (B, K, {self.channels}, {self.grid[0] * self.patch}, "
                             f"{self.grid[1] * self.patch}), got {tuple(x.shape)}")
        if t.shape != (b, k) or observed.shape != (b, k):
            raise ValueError(f"timesteps and observed mask must be (B, K)=({b}, {k}); "
                             f"got {tuple(t.shape)} and {tuple(observed.shape)}")
        indicator = observed.to(x.dtype)[:, :, None, None, None].expand(b, k, 1, h, w)
        if self.self_condition:
            if estimate is None:
                estimate = torch.zeros_like(x)
            elif estimate.shape != x.shape:
                raise ValueError(f"the self-conditioning estimate must be shaped as x {tuple(x.shape)}; "
                                 f"got {tuple(estimate.shape)}")
            inputs = torch.cat([x, estimate.to(x.dtype), indicator], dim=2)
        elif estimate is not None:
            raise ValueError("a self-conditioning estimate was given to a model built without self_condition "
                             "(diffusion.self_condition=false)")
        else:
            inputs = torch.cat([x, indicator], dim=2)
        tokens = self.to_tokens(inputs) + self.pos
        if self.frame_pos is not None:
            tokens = tokens + self.frame_pos[:k]
        cond = self.time_mlp(timestep_embedding(t, 256)) + self.observed_embed(observed.long())
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                tokens = checkpoint(block, tokens, cond, use_reentrant=False)
            else:
                tokens = block(tokens, cond)
        shift, scale = self.final_ada(cond)[:, :, None].chunk(2, dim=-1)
        out = self.to_frames(ops.adaln_modulate(tokens, shift, scale, self.final_norm.eps))
        if self.head_in is not None:
            out = self.refine(out, inputs, cond)
        if self.low_noise_skip > 0:
            level = t.round().long().clamp(0, self.skip_input.numel() - 1)[:, :, None, None, None]
            return (self.skip_input[level] * x + self.skip_output[level] * out).to(out.dtype)
        return out + last_observed(x, observed) if self.context_skip else out


def last_observed(x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """For every frame of x (B, K, C, H, W), the latest observed frame at or before it (zeros where none is).

    The context skip of an x0-predicting model: its output is this frame plus what the network adds, so an
    untrained model already continues the video by holding its last observed frame, and training learns only
    what changes (the motion), not how to redraw the scene from noise."""
    b, k = observed.shape
    index = torch.arange(k, device=x.device).expand(b, k)
    latest = torch.where(observed, index, -1).cummax(dim=1).values  # (B, K), -1 before the first observed frame
    picked = torch.gather(x, 1, latest.clamp_min(0)[:, :, None, None, None].expand_as(x))
    return picked * (latest >= 0)[:, :, None, None, None].to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
