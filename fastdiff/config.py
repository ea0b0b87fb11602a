"""Run configuration: dataclasses with presets, overridable from a TOML file and `--set key=value`.

Precedence (later wins): dataclass defaults < preset < TOML file < --set overrides < explicit flags.
`validate()` refuses a bad config before any work starts, naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib


from fastdiff_kernels.dispatch import BACKENDS as KERNEL_BACKENDS


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


# Every choice list, once: argparse, validation and the code that branches on them all read these.
STEP_MODES = ("eager", "device", "graph")  # run.step (fastdiff/step.py)
STRATEGIES = ("er", "none", "full", "offline", "gen-distill")  # replay.strategy (fastdiff/strategies.py)
# optim.name besides auto (fastdiff/optim.py). A run resumes with any AdamW of these, its moments converted; Muon's
# state (one momentum per matrix, no second moment) converts to none of them.
ADAMW_OPTIMIZERS = ("adamw8bit-fused", "adamw8bit-bnb", "adamw")
OPTIMIZERS = (*ADAMW_OPTIMIZERS, "muon")
DEVICE_SKIP_OPTIMIZERS = ("adamw", "adamw8bit-fused")  # the ones that skip a non-finite step on the device
SAMPLE_MODES = ("autoregressive", "fifo")  # fastdiff sample --mode (fastdiff/sampling.py)
AUGMENTS = ("none", "flips", "d4")  # run.augment (fastdiff/augment.py)


@dataclass
class ModelConfig:
    width: int = 64
    depth: int = 4
    heads: int = 4
    patch: int = 1
    mlp_ratio: float = 4.0
    checkpoint_activations: bool = False  # recompute blocks in backward to save memory
    pos_embed: str = "learned"  # learned, or sincos (DiT's fixed 2-D sine-cosine table)
    context_skip: bool = False  # x0 = last observed frame + network output (needs diffusion.prediction=x0)
    frame_pos: bool = False  # add a fixed sin-cos embedding of each frame's index in the window to its tokens
    joint_attention: bool = False  # the first attention of each block spans the whole clip, not one frame
    overlap: bool = False  # tokens read and draw half a patch beyond their own (strided conv in, transposed conv out)
    local_mix: bool = False  # each block's MLP also reads a depthwise 3x3x3 conv of its input over (frame, row, col)
    local_mix_kernel: int = 3  # the local mix's rows and columns (odd); it always spans 3 frames
    # Spatial attention adds a learned bias per head for each (row, column) token offset (Swin's relative position
    # bias). On tiny, 2 seeds: within the spread of the recipe's own draws, at 7-10% more CPU a step (AD1 in
    # profiles/learning/README.md), so off.
    spatial_bias: bool = False
    # > 0 (x0 prediction only): the noise-to-signal ratio below which the input passes through to the x0
    # prediction and the network only corrects it (EDM's skip, sigma_data = this); 0: the network draws x0 alone.
    low_noise_skip: float = 0.0
    # > 0: the patch output is refined at pixel resolution by two 3x3 convolutions of this many channels that read
    # it beside the noisy input and the observed-frame indicator, their hidden channels modulated by the frame's
    # timestep embedding (VideoDiT.refine). Why: a token draws its 4x4 pixels from one vector, and the gap between
    # two touching balls of one colour is a pixel or two inside or between tokens. 0: none. On tiny (P 16), 2 seeds:
    # fewer two-ball frames (50% / 62% against 73% / 74%; profiles/learning/README.md, ninth session), so off.
    pixel_head: int = 0


@dataclass
class AutoencoderConfig:
    latent: str = "ae"  # "ae": frozen conv autoencoder; "none": pixel space, as in the paper
    factor: int = 4  # spatial downsampling (1, 2, 4 or 8)
    channels: int = 4  # learned latent channels
    # "learned": the encoder sees colour and codes it as it likes. "pooled": the learned channels come from a
    # colour-blind encoder (each pixel's brightest channel) and three more channels carry each factor x factor
    # block's mean RGB, so that a colour costs in the latent diffusion loss about what it costs in pixels. Why:
    # fitted on balls, the learned code moves 3-6x less from red to green than from a ball to black (in pixels:
    # 2x more), and its samples turn yellow. On balls at 4,500 frames, 4 seeds: more two-ball frames and lower
    # minADE than pixels on every seed, colours kept but ColorKL still worse (profiles/learning/README.md,
    # "Colour in the latent"). Off: the maze and video latents are unmeasured with it.
    colour: str = "learned"
    # colour=pooled: the three colour channels' scale is divided by this, so that a colour change weighs more in the
    # latent diffusion loss (and is drawn at higher noise) against the learned channels' shape. At 1, red against
    # green is 0.8x a ball against black (pixels: 2x); at 2, 1.44x; the ratio cannot reach 2 while the learned
    # channels also see the ball. On balls at 4,500 frames (gain 2, width 16, 2 seeds): ColorKL 0.19-0.25 against
    # 0.63-1.63, but 14-17 points fewer two-ball frames and minADE 0.8 px worse (profiles/learning/README.md,
    # thirteenth session), so 1.
    colour_gain: float = 1.0
    hidden: int = 32
    warmup_frames: int = 1000  # stream prefix the autoencoder is fitted on, then frozen
    fit_steps: int = 400
    # A fitted autoencoder.pt (an earlier run's, of the same stream and these settings) to use instead of fitting
    # one: runs that differ only after the fit (a sweep, the learning study) skip its minutes. "": fit.
    load: str = ""
    fit_batch: int = 32
    lr: float = 2e-3

    def latent_channels_and_factor(self) -> tuple[int, int]:
        """(channels, spatial factor) of one frame's latent; pixel space is (3, 1)."""
        if self.latent == "none":
            return 3, 1
        return self.channels + (3 if self.colour == "pooled" else 0), self.factor


# Why the Heun sampler cannot condition on noised context; said by config validation and by sample_window (whose
# `sampler` argument can pick Heun after validation).
HEUN_REFUSES_CONTEXT_NOISE = "not supported because the Heun sampler holds observed frames at sigma 0"


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear (the paper's, 1000 steps) or cosine
    timesteps: int = 1000
    prediction: str = "eps"  # eps, v or x0
    # uniform, min-snr, or x0 (the MSE of the x0 the prediction implies: with v, a skip through x_t at low noise
    # and x0's weighting of the levels)
    loss_weight: str = "uniform"
    min_snr_gamma: float = 5.0
    # Each pixel's squared error near the frame's foreground counts 1 + foreground_weight times a background
    # pixel's (diffusion.foreground_weights; 0: every pixel alike). Balls are about a tenth of a black frame, and
    # two touching balls of one colour differ from one blob in a handful of pixels that the plain MSE barely sees.
    # On tiny, 3 seeds at 4 and at 9: two-ball frames and minADE within the seeds' spread of the plain loss
    # (profiles/learning/README.md, ninth session), so 0.
    foreground_weight: float = 0.0
    paper_pattern_prob: float = 0.5  # share of windows in the rollout's pattern (its observed frames clean, the rest
    # at one shared level); the others draw per-frame levels behind a clean prefix of 0 .. max(K/2, those) frames
    # Frames each autoregressive rollout window observes (0: K/2, as the paper samples); it generates the other
    # K - n and slides by that many. Fewer new frames per window keep each new frame near clean context, at more
    # windows per video. Training draws the same prefix (paper_pattern_prob), so the rollout's windows are in
    # its distribution.
    rollout_observed: int = 0
    sampler: str = "ddim"  # ddim or heun (EDM stochastic Heun, as the paper sampled)
    sample_steps: int = 50
    ddim_eta: float = 0.0
    sample_start: float = 1.0  # DDIM starts at this share of T from the last observed frame noised (1: pure noise)
    # DDIM window rollouts: each generated frame begins its sample_steps this share of them after the frame before
    # it (0: all frames of the window step together, as the paper samples). > 0 is the pyramid schedule of
    # ddim_sample: far frames are denoised beside nearer ones that are already cleaner, at (G - 1) * share *
    # sample_steps more model calls for G new frames. A share, not a count, so that it scales with sample_steps.
    # DDIM only: the Heun sampler steps every frame by one shared sigma schedule, and FIFO has its own diagonal.
    sample_frame_lag: float = 0.0
    # DDIM's levels: top * (1 - u)^sample_spacing for u evenly spaced in [0, 1]; 1 spaces them evenly, < 1 takes
    # fewer of the steps at low noise, > 1 more (ddim_sample).
    sample_spacing: float = 1.0
    # History guidance (classifier-free guidance on the observed frames, as Diffusion Forcing's history guidance):
    # each DDIM call also predicts with the observed frames replaced by pure noise at level T - 1 (a pattern
    # training draws: a window with no clean prefix), and steps with cond + w * (cond - uncond). 0: off; w > 0
    # costs 2x the model's work per call. DDIM only.
    history_guidance: float = 0.0
    # Training's rollout-pattern windows (paper_pattern_prob) stagger their generated frames' levels by
    # sample_frame_lag, as the pyramid sampler steps them, at a random point of its schedule; off, they share one
    # level (the paper's window) and the staggered windows are met only among the free per-frame draws. Measured
    # on the tiny recipe, 2 seeds: worse loss and minADE in both (profiles/learning/README.md, X1), so off.
    train_staggered: bool = False
    # Context noise (noise augmentation of the observed frames, as GameNGen and Diffusion Forcing train): each
    # training window's observed frames are noised to one level drawn from [0, context_noise * T), which the model
    # sees as those frames' timestep, so a rollout that conditions on its own imperfect frames is not out of
    # distribution. DDIM window rollouts (eval, sample's default mode) then condition on observed frames noised to
    # sample_context_noise * T; FIFO gives its emitted frames clean, as the model also sees at low context levels.
    context_noise: float = 0.0
    sample_context_noise: float = 0.0
    # Self-conditioning (Chen, Zhang and Hinton, "Analog Bits"): the model also reads an estimate of the clean
    # frames. In training, half the windows get the model's own x0 estimate from a first, gradient-free call at the
    # same input (the others zeros); DDIM hands each call the x0 of the call before it, so the layout a sample
    # has drawn so far (where two touching balls are) is an input, not only a memory of the noisy frames. Costs
    # one more forward a training step (35% more time per frame on tiny); sampling costs nothing more. Heun and
    # FIFO sample with the zero estimate, a pattern trained on half the windows. On tiny at 4,500 frames, 4 seeds:
    # two-ball frames 77.9% against 73.7% (paired differences -10 to +15 points), minADE 7.52 against 8.16 px,
    # ColorKL worse on two seeds; in the default job's 9.5 minutes at 2 threads it trained 1,516 frames against
    # the plain job's 3,272 on the same box (profiles/learning/README.md, tenth session), so off.
    self_condition: bool = False
    # Rollouts observe what they drew: each window's new frames are decoded to uint8 and encoded again before a
    # later window observes them (models.autoencoder.reencoder), as real context frames are, so that a later window
    # never conditions on latents the encoder would not produce. The video is unchanged by it; costs one decode and
    # encode a frame. In pixel space it only rounds the observed frames to uint8. On four pooled-latent models
    # (profiles/learning/README.md, sixteenth session): ColorKL better on all four, minADE worse on all four (by
    # 0.28-0.67 px), two-ball frames -3 to +8 points, so off.
    sample_reencode: bool = False
    # Redrawn context (scheduled sampling, for a denoiser): in this share of training windows the observed frames
    # are the model's own drawing of them, its x0 from one gradient-free call with those frames noised to one level
    # per window below context_redraw_level * T and the frames to predict pure noise (as the rollout's window before
    # drew them, without seeing their future), while the frames to predict keep their true targets. A rollout
    # conditions on frames the model drew; where it drew two touching balls of one colour as one blob, the next
    # window continues one ball. Trained this way the model meets its own drawing errors in the context, with the
    # truth after them. Costs one more forward a training step. On tiny at 4,500 frames (0.5, level 0.5), 4 seeds:
    # two-ball frames 65.6% against 73.7% (one seed 41% against 86%), minADE 8.40 against 8.16 px, held-out loss
    # higher on every seed (profiles/learning/README.md, eleventh session), so 0: off.
    context_redraw: float = 0.0
    context_redraw_level: float = 0.5


@dataclass
class ReplayConfig:
    strategy: str = "er"  # er (reservoir), none (live window only), full (everything seen), offline (i.i.d.
    # windows from the whole stream), gen-distill (teacher-generated replay, fastdiff/strategies.py)
    fraction: float = 0.05  # buffer = this share of the stream's frames, in windows (paper: 5%) ...
    windows: int = 0  # ... or an absolute number of windows when > 0
    storage: str = "latent"  # latent (bf16 on CUDA, fp32 on CPU) or pixel (uint8)
    live: int = 1  # live windows per batch
    replayed: int = 1  # replayed windows per batch (paper, balls: 1 live + 1 replay)
    # Prioritised replay (er, full): replayed windows drawn with probability proportional to score^priority, a
    # window's score its training loss smoothed over its replays (fastdiff/replay.py); 0: uniform, as the paper.
    # On balls at 1 it split two seeds (profiles/learning/README.md, Z rows), so tiny keeps 0.
    priority: float = 0.0
    teacher_every: int = 1000  # gen-distill: frames between teacher refreshes
    distill_steps: int = 2  # gen-distill: DDIM steps the teacher generates replay windows with (Masip et al.: 2)
    distill_weight: float = 1.0  # gen-distill: lambda on the distillation term


@dataclass
class OptimConfig:
    name: str = "auto"  # auto (see optimizer_name): adamw on a CPU; adamw8bit-bnb / adamw8bit-fused on a GPU; or muon
    # (fastdiff/optim.py MuonAdamW: Muon on the transformer blocks' matrices, AdamW on the rest, at the same lr)
    lr: float = 1e-4
    weight_decay: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    warmup: int = 0  # steps of linear learning-rate warm-up from 0
    # Share of the run's steps (run.frames) at its end over which the learning rate falls linearly to 0. 0 keeps it
    # constant, for a stream with no end; a run extended past its old end replans the cool-down over its new
    # length, so its rate rises again at once.
    cooldown: float = 0.0
    ema: float = 0.9999
    ema_warmup: bool = True  # decay = min(ema, (1+step)/(10+step)) so short runs sample a useful EMA


@dataclass
class RunConfig:
    stream: str = "balls-o"
    streams: str = ""  # one stream per rank under torchrun, ";"-separated (fastdiff/distributed.py)
    stream_options: str = ""  # the stream's own options, "key=value;key=value" (fastdiff/streams: parse_stream_options)
    frames: int = 0  # frames to train on (0: the preset's default)
    # A wall-clock limit on the whole job, in minutes: set-up, training and the final sample. 0: none. The run
    # measures its pace as it trains and, where the rest of run.frames would not fit, ends earlier, with its
    # cool-down replanned to the new last frame; it never trains more than run.frames. `tiny` sets it for the
    # default job's 10 minutes. Training is then deterministic only where no limit cuts the run.
    minutes: float = 0.0
    stream_frames: int = 0  # the stream's nominal length (drift of balls-c completes over it); 0: = frames
    window: int = 0  # K; 0: the stream's natural window (balls 10, maze 20)
    # Each training window mirrored at random (fastdiff/augment.py): none; flips (left-right, upside down); d4 (also
    # transposed). Only for streams with no preferred direction, as balls; pixel space only. On tiny (d4), 2 seeds:
    # held-out loss as good, fewer two-ball frames (59% / 69% against 73% / 74%) at 4,500 frames, so none.
    augment: str = "none"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on a CPU with native bf16, else fp32; resolve_precision)
    kernels: str = "auto"  # auto, triton, reference, sdpa, xformers (see kernels/dispatch.py)
    out: str = "runs"
    name: str = ""
    checkpoint_every: int = 500  # frames
    keep_checkpoints: int = 3
    sample_every: int = 1000  # frames; 0 disables periodic samples
    sample_frames: int = 30
    log_every: int = 50
    milestone_every: int = 0  # frames; >0 keeps the EMA weights every so often (milestones/) for eval curves, and
    # (balls streams) scores them on a few fixed held-out clips: loss, minADE, two-ball rate -> metrics.jsonl
    milestone_clips: int = 2  # held-out clips scored at each milestone (0: none)
    final_clips: int = 8  # balls: the final sample continues this many held-out clips (3 samples each) and is
    # scored with the floors into summary.json; 0: the final sample continues the live window, unscored
    compile: bool = False  # torch.compile(fullgraph=True) of the model
    async_ingest: bool = True  # read and encode the stream ahead on a thread / side stream (fastdiff/ingest.py)
    step: str = "eager"  # eager (reference), device (no host sync), graph (device step in one CUDA graph)
    nan_policy: str = "skip"  # skip (count and go on) or stop
    disk_full_policy: str = "continue"  # continue (report, keep the old checkpoint) or stop
    progress: bool = True
    threads: int = 0  # intra-op CPU threads; 0: the cores this process may run on (fastdiff/build.py)


@dataclass
class Config:
    preset: str = "tiny"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        cfg = cls()
        apply_mapping(cfg, data)
        return cfg


# Presets: model size and the defaults that go with it. `tiny` learns visibly on a 2-core CPU in
# minutes; `small` is the paper's Balls size (~8M parameters), `base` the paper's maze size (~75M).
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: the best recipe of the CPU learning study (profiles/learning/README.md): at equal CPU time, pixel
    # space with 4x4 patches, x0 prediction, fixed sin-cos positions, lr 1e-3 after 200 warm-up steps and the
    # paper's 1 live + 1 replayed window beat the earlier latent, eps, 1 + 5 recipe on every held-out number
    # (minADE 8.1 vs 10.2 px, ColorKL 0.14 vs 0.78, 3x the steps, no autoencoder fit). A buffer of half the
    # (short) stream's frames keeps early frames in replay. It samples with the pyramid schedule (each generated
    # frame starts 10 of its 20 stochastic DDIM steps after the one before): on a 600 CPU s model, minADE 7.76 vs
    # 8.13 px, ColorKL 0.16 vs 0.21 and 22% vs 15% two-ball frames against the synchronous window, at 3x its calls.
    # Since 2026-12-05: frame positions (frame_pos; minADE 0.2-0.8 px and ColorKL better in all three pairs of
    # rows) and lr 2e-3 (more two-ball frames at 5,500 steps), over 4,500 frames, which fit the default job's
    # 10 minutes on 2 idle cores now that OpenMP spins there. Since 2026-12-05 (later): the local mix
    # (model.local_mix, a depthwise 3x3x3 conv before each MLP): at 14% more CPU per step, the best row of the
    # study in both seeds on held-out loss (0.023 / 0.021 vs 0.033), minADE (7.55 / 7.38 vs 8.25 / 8.62 px) and
    # two-ball frames (72% / 78% vs 59% / 53%), with round balls instead of 4x4 blocks; its samples rarely
    # change colour. The default job: 85% two-ball frames (54% without), 9:18 of wall time. Since 2026-12-05
    # (last): the learning rate falls linearly to 0 over the run after its warm-up (optim.cooldown 1.0). In both
    # seeds, held-out loss 13% / 20% lower and samples that change colour at about the true rate (111 / 80
    # changes in 36 samples against 13 / 10; the truth ~105 / 100), ColorKL 0.012 / 0.007; minADE 0.4 px and
    # two-ball frames 2-7 points worse, within these clips' noise. The default job: ColorKL 0.015 (0.921 before),
    # 78% two-ball frames (85%), minADE 8.33 (8.23). Since 2026-12-06: a 9.5-minute limit on the whole job
    # (run.minutes), as the idle box ran 4,500 frames at 8 to 11 frames/s on different days and the final sample
    # takes 2-3 minutes: on a slow day the run ends earlier instead of running past the default job's 10 minutes
    # (on the idle box on 2026-12-06: all 4,500 frames, 9:09 in all). run.precision is pinned to fp32, the precision
    # every row of it was measured in (a CPU with bf16 instructions would otherwise take bf16: resolve_precision).
    "tiny": {
        "model": {"width": 96, "depth": 4, "heads": 3, "patch": 4, "pos_embed": "sincos", "frame_pos": True,
                  "local_mix": True},
        "autoencoder": {"latent": "none", "warmup_frames": 1000, "fit_steps": 400},
        "diffusion": {"prediction": "x0", "sample_steps": 20, "sample_frame_lag": 0.5, "ddim_eta": 1.0},
        "optim": {"lr": 2e-3, "warmup": 200, "cooldown": 1.0},
        "run": {"frames": 4500, "minutes": 9.5, "checkpoint_every": 500, "sample_every": 1500, "precision": "fp32"},
        "replay": {"live": 1, "replayed": 1, "fraction": 0.5},
    },
    "small": {
        "model": {"width": 256, "depth": 5, "heads": 4, "patch": 1},
        "run": {"frames": 100_000, "checkpoint_every": 5000, "sample_every": 20_000},
    },
    "base": {
        "model": {"width": 512, "depth": 12, "heads": 8, "patch": 2},
        "run": {"frames": 1_000_000, "checkpoint_every": 20_000, "sample_every": 100_000},
        "replay": {"live": 2, "replayed": 2},
    },
}


def _extended(base: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Preset `base` with `changes` applied section by section."""
    return {section: {**base.get(section, {}), **changes.get(section, {})} for section in {*base, *changes}}


# tiny-long: the best 20,000-frame CPU recipe measured (profiles/learning/README.md, "20,000 frames with Muon" and
# "Deterministic DDIM on the Muon model"), the CPU goal in one word. Training is the goal20k-muon run's:
# `tiny` with Muon over 20,000 frames, no time limit (3,823 s on one thread); Muon learned the motion faster at every
# milestone (one-call forecast 0.75 px at the end against AdamW's 1.28) and is the only optimizer measured whose
# forecast at ball-ball contacts passes constant velocity's (between 12,500 and 15,000 frames). Its final model
# sampled with deterministic DDIM (eta 0): minADE 6.17 px (eta 1: 7.03; repeat last 7.50, constant velocity 5.48),
# ColorKL 0.001, two balls in 86% of frames (74%). eta 0 hurt the 4,500-frame models, so `tiny` keeps eta 1.
# Those numbers are that run's and its final model's resampling. The preset run end to end (2026-12-06, one thread,
# 58:55 wall, a new draw of the same recipe): minADE 6.86 px (repeat last 7.50, constant velocity 5.48), ColorKL
# 0.030, two balls in 72% of frames, forecast 0.82 px, so eta 0's gain on two-ball frames did not repeat there.
PRESETS["tiny-long"] = _extended(PRESETS["tiny"], {
    "optim": {"name": "muon"},
    "diffusion": {"ddim_eta": 0.0},
    "run": {"frames": 20_000, "minutes": 0.0, "milestone_every": 2500, "milestone_clips": 4},
})

# tiny-latent: the default job on a CPU (`fastdiff train` with no arguments). `tiny`'s DiT on the pooled-colour
# latent (autoencoder.colour=pooled, a width-32 autoencoder fitted for 1,200 steps on the first 1,000 frames; an
# 8x8 latent in 1x1 patches, the same 64 tokens a frame as tiny's pixels in 4x4 patches), 10 sampler steps, and
# 6,500 frames (the 9.5-minute limit ends the run sooner on a slower machine). Why: at 4,500 frames it kept two
# balls in more generated frames than pixels on every seed measured and lowered minADE (profiles/learning/README.md,
# "Colour in the latent"); at 6,500, 91-100% on four seeds of four (95.4% in the mean, against 83.8% at 4,500),
# with a better forecast on every seed ("The spare minutes spent on frames"). Its colours are worse than pixels'
# (ColorKL ~0.5 against ~0.02), so the balls-c experiment, which reads forgetting from colours, trains `tiny`
# on a CPU (experiment.experiment_preset). Since 2026-12-08: run.precision=auto, so bf16 autocast where the CPU has
# bf16 instructions (the linears in bf16, attention and the local mix in fp32; models.dit.cpu_autocast_fp32): at
# 3,000 fixed frames on four seeds, 81.6% two-ball frames against fp32's 76.1% (paired -15 to +22 points, noise)
# with a step 1.4-1.6x as fast at one thread (1.18x in the default job at two), and the default job trained 5,960
# frames in 9:08 where fp32 trained 5,037 right after it on the same box (profiles/learning/README.md, "One window
# a step, bf16 matmuls on a CPU"). `tiny` pins fp32.
PRESETS["tiny-latent"] = _extended(PRESETS["tiny"], {
    "model": {"patch": 1},
    "autoencoder": {"latent": "ae", "colour": "pooled", "fit_steps": 1200},
    "diffusion": {"sample_steps": 10},
    "run": {"frames": 6500, "precision": "auto"},
})

# GPU presets: the fast path (bf16, fused 8-bit AdamW, compiled model, the step in one CUDA graph), sized with
# fastdiff/memory.py so that the estimate of the largest stream (the 64x64 maze, K = 20) stays under 85% of the
# budget; tests/test_memory.py checks that, and on a GPU enforces the budget with a per-process memory fraction.
_GPU_RUN = {"frames": 1_000_000, "checkpoint_every": 20_000, "sample_every": 100_000, "precision": "bf16",
            "compile": True, "step": "graph"}
PRESETS.update({
    "gpu-8gb": {"model": {"width": 384, "depth": 8, "heads": 6, "patch": 1, "checkpoint_activations": True},
                "run": _GPU_RUN, "replay": {"live": 2, "replayed": 6}, "optim": {"name": "adamw8bit-fused"}},
    "gpu-12gb": {"model": {"width": 512, "depth": 10, "heads": 8, "patch": 1, "checkpoint_activations": True},
                 "run": _GPU_RUN, "replay": {"live": 2, "replayed": 6}, "optim": {"name": "adamw8bit-fused"}},
    "gpu-24gb": {"model": {"width": 640, "depth": 12, "heads": 10, "patch": 1, "checkpoint_activations": True},
                 "run": _GPU_RUN, "replay": {"live": 2, "replayed": 6}, "optim": {"name": "adamw8bit-fused"}},
    "h100": {"model": {"width": 768, "depth": 12, "heads": 12, "patch": 1},
             "run": _GPU_RUN, "replay": {"live": 2, "replayed": 6}, "optim": {"name": "adamw8bit-fused"}},
})
PRESET_BUDGET_GIB = {"gpu-8gb": 8, "gpu-12gb": 12, "gpu-24gb": 24, "h100": 80}

CHOICES = {
    "autoencoder.latent": ("ae", "none"),
    "autoencoder.colour": ("learned", "pooled"),
    "model.pos_embed": ("learned", "sincos"),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.prediction": ("eps", "v", "x0"),
    "diffusion.loss_weight": ("uniform", "min-snr", "x0"),
    "diffusion.sampler": ("ddim", "heun"),
    "replay.strategy": STRATEGIES,
    "replay.storage": ("latent", "pixel"),
    "optim.name": ("auto", *OPTIMIZERS),
    "run.precision": ("auto", "bf16", "fp32"),
    "run.kernels": KERNEL_BACKENDS,
    "run.nan_policy": ("skip", "stop"),
    "run.augment": AUGMENTS,
    "run.step": STEP_MODES,
    "run.disk_full_policy": ("continue", "stop"),
}


def _section_and_field(cfg: Config, dotted: str):
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] == "preset":
        return cfg, "preset"
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: expected section.field (e.g. optim.lr)")
    section_name, name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        sections = [f.name for f in dataclasses.fields(cfg) if f.name != "preset"]
        raise ConfigError(f"{dotted}: unknown section {section_name!r}; sections are {', '.join(sections)}")
    if name not in {f.name for f in dataclasses.fields(section)}:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{dotted}: unknown field; {section_name} has {known}")
    return section, name


def _coerce(dotted: str, current: Any, value: Any) -> Any:
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
        try:
            return kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise ConfigError(f"{dotted}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{dotted}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    section, name = _section_and_field(cfg, dotted)
    setattr(section, name, _coerce(dotted, getattr(section, name), value))


def apply_mapping(cfg: Config, data: dict, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            apply_mapping(cfg, value, prefix=f"{dotted}.")
        else:
            set_value(cfg, dotted, value)


def apply_preset(cfg: Config, preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg.preset = preset
    apply_mapping(cfg, PRESETS[preset])


def load_toml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"--config: file not found: {path}")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config: {path} is not valid TOML: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def build_config(preset: str | None = None, toml_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """Defaults < preset < TOML < overrides. The preset may also come from the TOML or overrides."""
    data = load_toml(toml_path) if toml_path else {}
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or preset or data.pop("preset", None) or default_preset()
    data.pop("preset", None)
    cfg = Config()
    apply_preset(cfg, preset)
    apply_mapping(cfg, data)
    for key, value in overrides.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


CPU_PRESET = "tiny-latent"


def default_preset() -> str:
    """The preset that fits this machine: tiny-latent on CPU; bigger ones are chosen by GPU memory."""
    try:
        import torch

        if torch.cuda.is_available():
            total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            for name in ("h100", "gpu-24gb", "gpu-12gb", "gpu-8gb"):
                if total_gib >= 0.9 * PRESET_BUDGET_GIB[name]:
                    return name
            return "small"
    except Exception:
        pass
    return CPU_PRESET


def live_ring_frames(replay: ReplayConfig, window: int) -> int:
    """Frames the step's live ring holds: its replay.live newest windows, overlapping; one window with replay.live=0,
    whose newest window still enters the buffer after every step."""
    return window + max(replay.live, 1) - 1


def cpu_has_native_bf16() -> bool:
    """True where this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX): there oneDNN's bf16 matmuls took
    0.37x the time of its fp32 ones on tiny-latent's shapes (2 threads). Without them bf16 is emulated, and slower
    than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_precision(precision: str, device_type: str) -> str:
    """run.precision with `auto` resolved: bf16 autocast on CUDA and on a CPU with native bf16 (cpu_has_native_bf16);
    fp32 on other CPUs."""
    if precision != "auto":
        return precision
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def optimizer_name(cfg: Config, device_type: str = "cuda") -> str:
    """optim.name with `auto` resolved. On a GPU: bitsandbytes' 8-bit AdamW for the eager step, ours for the
    sync-free one (it skips a non-finite step on the device). On a CPU: torch's fused AdamW, the fastest there
    (bitsandbytes' CPU step takes 1.7x as long on the tiny preset) and 8-bit state saves nothing that matters."""
    if cfg.optim.name != "auto":
        return cfg.optim.name
    if device_type == "cpu":
        return "adamw"
    return "adamw8bit-bnb" if cfg.run.step == "eager" else "adamw8bit-fused"


def validate(cfg: Config) -> None:
    """Refuse a bad config before any work, naming the field. Checks that need the machine (a CUDA device, free
    memory, the number of ranks) are made where the machine is known: fastdiff/build.py, step.py, distributed.py."""
    for dotted, allowed in CHOICES.items():
        section, name = _section_and_field(cfg, dotted)
        if getattr(section, name) not in allowed:
            raise ConfigError(f"{dotted}: {getattr(section, name)!r} is not one of {', '.join(allowed)}")
    positive = {
        "model.width": cfg.model.width, "model.depth": cfg.model.depth, "model.heads": cfg.model.heads,
        "model.patch": cfg.model.patch, "autoencoder.channels": cfg.autoencoder.channels,
        "autoencoder.hidden": cfg.autoencoder.hidden, "autoencoder.colour_gain": cfg.autoencoder.colour_gain,
        "diffusion.timesteps": cfg.diffusion.timesteps,
        "diffusion.sample_steps": cfg.diffusion.sample_steps,
        "run.checkpoint_every": cfg.run.checkpoint_every, "run.keep_checkpoints": cfg.run.keep_checkpoints,
        "run.log_every": cfg.run.log_every, "run.sample_frames": cfg.run.sample_frames,
        "replay.teacher_every": cfg.replay.teacher_every, "replay.distill_steps": cfg.replay.distill_steps,
    }
    for dotted, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{dotted}: must be positive, got {value}")
    non_negative = {
        "run.frames": cfg.run.frames, "run.window": cfg.run.window, "run.sample_every": cfg.run.sample_every,
        "run.stream_frames": cfg.run.stream_frames, "replay.live": cfg.replay.live,
        "replay.replayed": cfg.replay.replayed,
        "replay.windows": cfg.replay.windows, "autoencoder.warmup_frames": cfg.autoencoder.warmup_frames,
        "autoencoder.fit_steps": cfg.autoencoder.fit_steps, "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip, "diffusion.ddim_eta": cfg.diffusion.ddim_eta,
        "run.milestone_every": cfg.run.milestone_every, "replay.distill_weight": cfg.replay.distill_weight,
        "run.milestone_clips": cfg.run.milestone_clips, "run.final_clips": cfg.run.final_clips,
        "optim.warmup": cfg.optim.warmup, "run.threads": cfg.run.threads, "replay.priority": cfg.replay.priority,
        "run.minutes": cfg.run.minutes,
    }
    for dotted, value in non_negative.items():
        if not value >= 0:  # NaN too
            raise ConfigError(f"{dotted}: must not be negative, got {value}")
    if cfg.model.local_mix_kernel < 1 or cfg.model.local_mix_kernel % 2 == 0:
        raise ConfigError(f"model.local_mix_kernel: must be odd and positive (a window centred on its token), got "
                          f"{cfg.model.local_mix_kernel}")
    if cfg.model.width % cfg.model.heads:
        raise ConfigError(f"model.width: {cfg.model.width} is not divisible by model.heads={cfg.model.heads}")
    if cfg.model.width // cfg.model.heads not in (32, 64, 128):
        raise ConfigError(
            f"model.heads: head dim model.width/model.heads = {cfg.model.width // cfg.model.heads} is not "
            "supported; the fused temporal attention kernel serves head dims 32, 64 and 128"
        )
    if cfg.autoencoder.factor not in (1, 2, 4, 8):
        raise ConfigError(f"autoencoder.factor: must be 1, 2, 4 or 8, got {cfg.autoencoder.factor}")
    if cfg.replay.priority and cfg.replay.strategy not in ("er", "full"):
        raise ConfigError(f"replay.priority={cfg.replay.priority} with replay.strategy={cfg.replay.strategy} not "
                          "supported because only er and full keep a buffer whose windows it could prioritise")
    if not 0.0 < cfg.replay.fraction <= 1.0:
        raise ConfigError(f"replay.fraction: must be in (0, 1], got {cfg.replay.fraction}")
    if not 0.0 < cfg.diffusion.sample_start <= 1.0:
        raise ConfigError(f"diffusion.sample_start: must be in (0, 1], got {cfg.diffusion.sample_start}")
    if cfg.diffusion.history_guidance < 0 or (cfg.diffusion.history_guidance and cfg.diffusion.sampler != "ddim"):
        raise ConfigError(f"diffusion.history_guidance: must be >= 0, and is supported with the ddim sampler only "
                          f"(it guides each DDIM call); got {cfg.diffusion.history_guidance} with "
                          f"diffusion.sampler={cfg.diffusion.sampler}")
    if not cfg.diffusion.sample_spacing > 0:
        raise ConfigError(f"diffusion.sample_spacing: must be > 0 (an exponent of the ladder of levels); got "
                          f"{cfg.diffusion.sample_spacing}")
    if not 0.0 <= cfg.diffusion.sample_frame_lag <= 1.0:
        raise ConfigError(f"diffusion.sample_frame_lag: must be in [0, 1], a share of diffusion.sample_steps; "
                          f"got {cfg.diffusion.sample_frame_lag}")
    for dotted, share in (("diffusion.context_noise", cfg.diffusion.context_noise),
                          ("diffusion.sample_context_noise", cfg.diffusion.sample_context_noise),
                          ("diffusion.context_redraw_level", cfg.diffusion.context_redraw_level)):
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"{dotted}: must be in [0, 1), a share of diffusion.timesteps; got {share}")
    pyramid_from_noise = (cfg.diffusion.sampler == "ddim" and cfg.diffusion.sample_frame_lag > 0
                          and cfg.diffusion.sample_start == 1.0)
    if cfg.diffusion.train_staggered and not pyramid_from_noise:
        raise ConfigError("diffusion.train_staggered is not supported without the pyramid sampler starting from "
                          "pure noise, because it trains on the levels that sampler's frame lag gives from T down; "
                          "set diffusion.sampler=ddim, diffusion.sample_frame_lag > 0 and diffusion.sample_start=1, "
                          "or leave it off")
    if cfg.diffusion.sample_context_noise > 0 and cfg.diffusion.sampler != "ddim":
        raise ConfigError(f"diffusion.sample_context_noise with diffusion.sampler={cfg.diffusion.sampler} "
                          f"{HEUN_REFUSES_CONTEXT_NOISE}; use diffusion.sampler=ddim")
    if cfg.diffusion.rollout_observed < 0 or (cfg.run.window and cfg.diffusion.rollout_observed >= cfg.run.window):
        raise ConfigError(f"diffusion.rollout_observed: must be 0 (K/2) or in [1, K - 1] for the window K, got "
                          f"{cfg.diffusion.rollout_observed}")
    if not 0.0 <= cfg.diffusion.paper_pattern_prob <= 1.0:
        raise ConfigError(f"diffusion.paper_pattern_prob: must be in [0, 1], got {cfg.diffusion.paper_pattern_prob}")
    if not 0.0 < cfg.optim.lr < 1.0:
        raise ConfigError(f"optim.lr: must be in (0, 1), got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.cooldown <= 1.0:
        raise ConfigError(f"optim.cooldown: must be in [0, 1] (a share of run.frames), got {cfg.optim.cooldown}")
    if not 0.0 <= cfg.optim.ema < 1.0:
        raise ConfigError(f"optim.ema: must be in [0, 1), got {cfg.optim.ema}")
    for dotted, beta in (("optim.beta1", cfg.optim.beta1), ("optim.beta2", cfg.optim.beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"{dotted}: must be in [0, 1), got {beta}")
    if cfg.diffusion.sample_steps > cfg.diffusion.timesteps:
        raise ConfigError(
            f"diffusion.sample_steps: {cfg.diffusion.sample_steps} exceeds diffusion.timesteps="
            f"{cfg.diffusion.timesteps}"
        )
    if cfg.model.spatial_bias and cfg.model.joint_attention:
        raise ConfigError("model.spatial_bias with model.joint_attention is not supported because the bias is defined "
                          "between the tokens of one frame, and joint attention spans the whole clip")
    if cfg.diffusion.loss_weight == "x0" and cfg.diffusion.prediction == "eps":
        raise ConfigError("diffusion.loss_weight=x0 with diffusion.prediction=eps not supported because eps's x0 "
                          "weight sigma^2 / alpha^2 is unbounded at the top noise level; predict v or x0")
    if cfg.autoencoder.colour_gain != 1.0 and cfg.autoencoder.colour != "pooled":
        raise ConfigError("autoencoder.colour_gain with autoencoder.colour=learned not supported because the learned "
                          "code has no colour channels of its own to weigh; pick autoencoder.colour=pooled")
    if cfg.autoencoder.colour == "pooled" and cfg.autoencoder.latent == "none":
        raise ConfigError("autoencoder.colour=pooled with autoencoder.latent=none not supported because pixel space "
                          "has no autoencoder to code colour; pick autoencoder.latent=ae")
    if cfg.run.augment != "none" and cfg.autoencoder.latent != "none":
        raise ConfigError(f"run.augment={cfg.run.augment} with autoencoder.latent={cfg.autoencoder.latent} not "
                          "supported because the autoencoder's latents do not mirror with the frames; train in pixel "
                          "space (autoencoder.latent=none)")
    # options of the training loss that generative distillation's own loss does not go through
    for option, on in (("diffusion.self_condition", cfg.diffusion.self_condition),
                       ("diffusion.context_redraw", cfg.diffusion.context_redraw > 0)):
        if on and cfg.replay.strategy == "gen-distill":
            raise ConfigError(f"{option} with replay.strategy=gen-distill not supported because the distillation "
                              "loss regresses onto the teacher's targets in its own loss, not through "
                              "training_loss, which applies it; train with er, none, full or offline")
    if not 0.0 <= cfg.diffusion.context_redraw <= 1.0:
        raise ConfigError(f"diffusion.context_redraw: must be in [0, 1], a share of the training windows; got "
                          f"{cfg.diffusion.context_redraw}")
    if cfg.replay.live == 0 and (cfg.replay.strategy not in ("er", "full") or cfg.replay.replayed == 0):
        raise ConfigError(f"replay.live=0 with replay.strategy={cfg.replay.strategy} and replay.replayed="
                          f"{cfg.replay.replayed} not supported because the step's only windows are then drawn from "
                          "the replay buffer: use replay.strategy=er or full with replay.replayed >= 1")
    if cfg.diffusion.foreground_weight < 0:
        raise ConfigError(f"diffusion.foreground_weight: must be >= 0; got {cfg.diffusion.foreground_weight}")
    if cfg.model.pixel_head < 0:
        raise ConfigError(f"model.pixel_head: must be >= 0 (channels; 0: none); got {cfg.model.pixel_head}")
    if cfg.model.low_noise_skip < 0:
        raise ConfigError(f"model.low_noise_skip: must be >= 0; got {cfg.model.low_noise_skip}")
    if cfg.model.low_noise_skip > 0 and cfg.diffusion.prediction != "x0":
        raise ConfigError(f"model.low_noise_skip with diffusion.prediction={cfg.diffusion.prediction} not supported "
                          "because the skip is part of an x0 prediction (v already passes its input through); "
                          "set diffusion.prediction=x0")
    if cfg.model.low_noise_skip > 0 and cfg.model.context_skip:
        raise ConfigError("model.low_noise_skip with model.context_skip not supported because each is a skip into "
                          "the x0 prediction (from the noisy frame, or from the last observed one); pick one")
    if cfg.model.context_skip and cfg.diffusion.prediction != "x0":
        raise ConfigError(f"model.context_skip with diffusion.prediction={cfg.diffusion.prediction} not supported "
                          "because the skip adds the last observed frame to a prediction of the clean frame; "
                          "set diffusion.prediction=x0")
    if cfg.run.window == 1:
        raise ConfigError("run.window: a window needs at least 2 frames (observed + generated)")
    _check_step_mode(cfg)


def _check_step_mode(cfg: Config) -> None:
    mode, optimizer = cfg.run.step, optimizer_name(cfg)
    if mode == "eager":
        return
    if optimizer not in DEVICE_SKIP_OPTIMIZERS:
        raise ConfigError(
            f"run.step={mode} with optim.name={optimizer} not supported because that optimizer cannot skip a "
            "non-finite step on the device (bitsandbytes' 8-bit step synchronises per parameter; Muon's is torch's, "
            "which takes no found_inf); use optim.name=adamw8bit-fused (same 8-bit state) or adamw")
    if mode == "graph" and cfg.replay.strategy == "gen-distill":
        raise ConfigError("run.step=graph with replay.strategy=gen-distill not supported because the teacher is "
                          "replaced on every refresh, which a captured graph cannot see; use run.step=device")
    if mode == "graph" and cfg.run.nan_policy == "stop":
        raise ConfigError("run.step=graph with run.nan_policy=stop not supported because stopping at once needs a "
                          "host sync every step; use nan_policy=skip (skips are counted and reported)")
