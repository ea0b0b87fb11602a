"""Time the paper's reference implementation against fastdiff on the same stream and batch, step for step.

The reference is plai-group/lifelong-vdm (FDM U-Net video model, pixel space), imported from a checkout the
user points at; none of its code is copied here. Both sides take the paper's Balls step: batch 2 windows of
K = 10 frames (1 live + 1 replayed), first 5 frames observed, eps-prediction MSE on the other 5, linear
1000-step schedule, AdamW lr 1e-4 / weight decay 1e-5, one step per frame of the generated balls stream.

  reference   what `scripts/video_train.py --dataset=streaming_ball_stn --num_res_blocks=1 --num_channels=64
              --max_frames=10 --batch_size=2 --ltm_size=5000 --n_sample_stm=1 --lr=1e-4 --weight_decay=1e-5`
              (their README's ER command) builds: the model and diffusion from their
              model_and_diffusion_defaults("unet") with what their train_entry.resolve_args derives for that
              command (image_size 32, in_channels 3, diffusion_space "pixel", not pre-encoded), and their own
              TrainLoop, whose run_step is timed: masks and batch gathering, their training_losses, the NaN
              check, loss bookkeeping, backward, grad-norm bookkeeping, AdamW and the EMA update (0.9999).
              Their loop's logger.dumpkvs (wandb / MPI, every 10 steps) and checkpointing are left out, as
              fastdiff's metrics and checkpoints are.
  fastdiff    one_frame(trainer) of bench/bench_train_step.py in fp32 with torch AdamW (ingest, live +
              replayed window, noising, forward, loss, backward, clipping, optimizer, EMA, reservoir insert):
              `small` in pixel space (patch 4: 8x8 tokens per 32x32 frame; about the U-Net's parameter
              count) and `tiny` as the trainer runs it by default (latent).

The implementations are timed interleaved, one step each in turn (A B C A B C ...), after a warm-up, so a
load spike on a shared machine hits all of them; each reports the median and interquartile range of ms
per step, and the ratio of medians to the reference.

    python bench/compare_lifelong_vdm.py --repo ../lifelong-vdm [--device cpu] [--repeats 20] [--out FILE.json]

--repeats is the number of interleaved rounds timed (default 20); --smoke runs two rounds with fastdiff's
side at the smoke size of bench_train_step.py (it checks the script runs against a checkout).

Any problem with the checkout (a missing file, a missing dependency, an API that changed) is one line on
stderr naming what is missing, and exit status 2. mpi4py, blobfile and wandb (and timm and einops, which
only its VDT backbone uses) are imported by the checkout but not used on the timed path; when absent, the
script puts minimal stand-ins in sys.modules and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import utils
from bench_train_step import SMOKE_MODEL, make_trainer, model_parameters, one_frame, prime

from fastdiff.streams import make_stream

WINDOW, OBSERVED, BATCH = 10, 5, 2
DATASET = "streaming_ball_stn"  # their README's Balls (O) stream; resolve_args reads the image size from it
# What lifelong-vdm's train_entry.resolve_args derives for DATASET in pixel space (their default
# --diffusion_space): model_and_diffusion_defaults leaves diffusion_space None, which their
# GaussianDiffusion.setup_enc_dec refuses ("Unknown diffusion space: None").
RESOLVED = {"image_size": 32, "in_channels": 3,
            "diffusion_space_kwargs": {"diffusion_space": "pixel", "pre_encoded": False}}
COMMAND = {"num_channels": 64, "num_res_blocks": 1}  # the README's U-Net Balls command
LOOP = dict(lr=1e-4, weight_decay=1e-5, ema_rate="0.9999", batch_size=BATCH, max_frames=WINDOW,
            log_interval=10, save_interval=100000, sample_interval=50000, use_fp16=False, fp16_scale_growth=1e-3,
            lr_anneal_steps=0, pad_with_random_frames=True, enc_dec_chunk_size=20, steps_per_experience=1,
            masking_mode="autoregressive", clip_grad=None, optimizer="adam", distill_weight=0.0)
REQUIRED = ("improved_diffusion/__init__.py", "improved_diffusion/script_util.py", "improved_diffusion/train_util.py",
            "improved_diffusion/gaussian_diffusion.py", "improved_diffusion/unet.py", "improved_diffusion/resample.py",
            "improved_diffusion/dist_util.py", "improved_diffusion/logger.py")
OURS = {"fastdiff small (pixel, patch 4)": ("small", {"autoencoder.latent": "none", "model.patch": "4"}),
        "fastdiff tiny (latent)": ("tiny", {"autoencoder.latent": "ae", "model.patch": "1"})}
FP32_ADAMW = {"run.precision": "fp32", "optim.name": "adamw"}


class CheckoutError(Exception):
    """The user's checkout cannot be run as the comparison needs: the message names what is missing."""


# ---------------------------------------------------------------------------------------------------- stand-ins


class _Comm:
    """mpi4py's COMM_WORLD for one process: what their logger and dist_util call."""

    rank, size = 0, 1

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return 0

    def Get_size(self):  # noqa: N802
        return 1

    def bcast(self, value, root=0):
        return value

    def gather(self, value, root=0):
        return [value]

    def barrier(self):
        return None


def _refusing(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in (the package is not installed): it is not on the timed path")

    return call


def _stand_in_mpi4py():
    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = _Comm()
    return {"mpi4py": types.ModuleType("mpi4py"), "mpi4py.MPI": mpi}


def _stand_in_blobfile():
    bf = types.ModuleType("blobfile")  # used on save and resume only
    bf.join, bf.dirname, bf.exists = os.path.join, os.path.dirname, os.path.exists
    bf.BlobFile = open
    return {"blobfile": bf}


def _stand_in_wandb():
    wandb = types.ModuleType("wandb")  # logging and sample videos only
    wandb.run = None
    wandb.init = wandb.log = lambda *args, **kwargs: None
    wandb.Video = wandb.Histogram = _refusing("wandb")
    return {"wandb": wandb}


def _stand_in_timm():
    names = ("timm", "timm.models", "timm.models.vision_transformer")  # the VDT backbone's layers
    modules = {n: types.ModuleType(n) for n in names}
    for attr in ("PatchEmbed", "Attention", "Mlp"):
        setattr(modules["timm.models.vision_transformer"], attr, _refusing(f"timm {attr}"))
    return modules


def _stand_in_einops():
    einops = types.ModuleType("einops")  # the VDT backbone's reshapes
    for attr in ("rearrange", "reduce", "repeat"):
        setattr(einops, attr, _refusing(f"einops.{attr}"))
    return {"einops": einops}


# package -> (stand-in factory, what in the checkout imports it and why the timed path does not need it)
OPTIONAL = {
    "mpi4py": (_stand_in_mpi4py, "their logger and dist_util (one process: rank 0 of 1)"),
    "blobfile": (_stand_in_blobfile, "checkpoint saving and resuming in train_util"),
    "wandb": (_stand_in_wandb, "logging and sample videos (their logger's dumpkvs is not timed)"),
    "timm": (_stand_in_timm, "the VDT backbone in vdt.py (the U-Net does not use it)"),
    "einops": (_stand_in_einops, "the VDT backbone in vdt.py (the U-Net does not use it)"),
}


def install_stand_ins() -> list[str]:
    """Stand-ins for the optional packages that are not installed; returns what was stood in and why."""
    said = []
    for name, (factory, why) in OPTIONAL.items():
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules.update(factory())
            said.append(f"{name} (used by {why})")
    return said


# ---------------------------------------------------------------------------------------------------- reference


def checkout_commit(repo: Path) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


@contextlib.contextmanager
def _cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _one_process_group(folder: Path) -> None:
    """What their dist_util.setup_dist does for one process, without MPI: a gloo group of size 1."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{folder / 'process-group'}", rank=0, world_size=1)


def build_reference(repo: Path, device: torch.device, scratch: Path):
    """Their U-Net, diffusion and TrainLoop as their entry point would build them for the README's command."""
    missing = [f for f in REQUIRED if not (repo / f).is_file()]
    if missing:
        raise CheckoutError(f"--repo {repo}: not a lifelong-vdm checkout (missing {', '.join(missing)})")
    sys.path.insert(0, str(repo))
    try:
        script_util = importlib.import_module("improved_diffusion.script_util")
        train_util = importlib.import_module("improved_diffusion.train_util")
        resample = importlib.import_module("improved_diffusion.resample")
    except ImportError as err:
        what = err.name or str(err)
        raise CheckoutError(f"lifelong-vdm at {repo} needs {what!r}, which is not installed or not found "
                            f"({type(err).__name__}: {err})") from err
    for module, name in ((script_util, "model_and_diffusion_defaults"), (script_util, "create_model_and_diffusion"),
                         (train_util, "TrainLoop"), (resample, "create_named_schedule_sampler")):
        if not hasattr(module, name):
            raise CheckoutError(f"lifelong-vdm at {repo}: {module.__name__} has no {name} (an API this script "
                                f"uses; the checkout is older or newer than it expects)")
    settings = script_util.model_and_diffusion_defaults("unet")
    settings.update(COMMAND)
    settings.update(RESOLVED)
    model, diffusion = script_util.create_model_and_diffusion("unet", **settings)
    model.to(device)
    _one_process_group(scratch)
    # resume_id names a checkpoint folder under the working directory, here an empty scratch one: their
    # loop finds nothing to resume and starts fresh, without a wandb run to take an id from
    args = argparse.Namespace(resume_id="fastdiff-compare", dataset=DATASET, n_sample_stm=1, ltm_size=5000, T=WINDOW,
                              **settings)
    with _cwd(scratch):
        loop = train_util.TrainLoop(model=model, diffusion=diffusion, data=None, args=args,
                                    diffusion_space_kwargs=settings["diffusion_space_kwargs"],
                                    schedule_sampler=resample.create_named_schedule_sampler("uniform", diffusion),
                                    **LOOP)
    return loop


def balls_frames(count: int, device: torch.device) -> torch.Tensor:
    """(count, 3, 32, 32) frames of the balls stream in [-1, 1], as their ContinuousBaseDataset gives them."""
    frames = make_stream("balls-o", total_frames=10**6).read(count)
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def reference_step(loop, frames: torch.Tensor, device: torch.device):
    """One step of their loop per call, on the next live window and a replayed one from the past."""
    position = {"i": 0}
    generator = torch.Generator().manual_seed(0)

    def step():
        i = position["i"] % (len(frames) - WINDOW)
        past = int(torch.randint(0, i + 1, (), generator=generator))  # a window a reservoir could hold
        starts = (i, past)
        batch = torch.stack([frames[s:s + WINDOW] for s in starts])
        index_map = [torch.arange(s, s + WINDOW) for s in starts]  # absolute frame indices, as their loader gives
        loop.run_step(batch, None, index_map)
        loop.step += 1  # their run_loop's counter
        position["i"] += 1

    return step


# ---------------------------------------------------------------------------------------------------- the run


def compare(repo: Path, device: torch.device, repeats: int, warmup: int, smoke: bool = False,
            log=print) -> dict:
    stood_in = install_stand_ins()
    if stood_in:
        log("stand-ins for packages not installed here (not on the timed path): " + "; ".join(stood_in))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        try:
            loop = build_reference(repo, device, scratch)
            steps = {"lifelong-vdm U-Net": reference_step(loop, balls_frames(repeats + warmup + 4 * WINDOW, device),
                                                          device)}
            steps["lifelong-vdm U-Net"]()  # the checkout's own first step: an API change fails here, untimed
        except CheckoutError:
            raise
        except Exception as err:  # anything else the checkout raises is about the checkout, said in one line
            where = _origin(err, repo)
            raise CheckoutError(f"lifelong-vdm at {repo} failed{where}: {type(err).__name__}: {err}") from err
        parameters = {"lifelong-vdm U-Net": sum(p.numel() for p in loop.model.parameters())}
        trainers = {}
        for name, (preset, overrides) in OURS.items():
            size = SMOKE_MODEL if smoke else {}  # --smoke: our side at the smoke size (checks the script runs)
            settings = {**size, **FP32_ADAMW, **overrides}
            trainers[name] = make_trainer(preset, device, settings, scratch / name.split()[1])
            prime(trainers[name], warmup=1)
            parameters[name] = model_parameters(trainers[name])
            steps[name] = lambda t=trainers[name]: one_frame(t)
        timings = utils.side_by_side(steps, device, repeats, warmup=warmup)
    reference = timings["lifelong-vdm U-Net"].median
    rows = [{"impl": name, "parameters": parameters[name], "parameters_M": round(parameters[name] / 1e6, 2),
             "median_ms_per_step": round(t.median, 2), "iqr_ms": round(t.iqr, 2), "q1_ms": round(t.q1, 2),
             "q3_ms": round(t.q3, 2), "steps_timed": t.samples,
             "reference_time_ratio": round(reference / t.median, 3)} for name, t in timings.items()]
    return {"device": utils.device_name(device), "machine": _machine(device), "date": utils.today(), "smoke": smoke,
            "lifelong_vdm": str(repo), "lifelong_vdm_commit": checkout_commit(repo), "stand_ins": stood_in,
            "batch": BATCH, "window": WINDOW, "observed": OBSERVED, "warmup_steps": warmup, "timed_rounds": repeats,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}


def _origin(err: BaseException, repo: Path) -> str:
    """' in improved_diffusion/x.py:123 (function)' for the innermost frame inside the checkout, if any."""
    tb, found = err.__traceback__, ""
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if repo.resolve() in path.resolve().parents:
            found = f" in {path.resolve().relative_to(repo.resolve())}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return found


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " ")


def markdown(result: dict) -> str:
    lines = [f"# lifelong-vdm vs fastdiff, one online step (batch {result['batch']}, K = {result['window']})", "",
             f"Measured {result['date']} on {result['machine']} ({result['device']}, torch {result['torch']}, "
             f"{result['threads']} threads) by bench/compare_lifelong_vdm.py against lifelong-vdm at "
             f"`{result['lifelong_vdm']}` (commit {result['lifelong_vdm_commit']}). Interleaved, one step of "
             f"each in turn, {result['timed_rounds']} rounds after {result['warmup_steps']} warm-up rounds.", ""]
    if result["stand_ins"]:
        lines += ["Stand-ins (not installed here, not on the timed path): " + "; ".join(result["stand_ins"]), ""]
    lines += ["| implementation | parameters | median ms/step | IQR ms | reference time / this |",
              "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['impl']} | {r['parameters_M']:.2f}M | {r['median_ms_per_step']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{r['reference_time_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--repo", required=True, help="path to a plai-group/lifelong-vdm checkout")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds before timing (default 3; smoke 1)")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "compare_lifelong_vdm", repeats=20, smoke_repeats=2)
    try:
        result = compare(Path(args.repo).expanduser(), run.device, run.repeats,
                         args.warmup if args.warmup is not None else (1 if run.smoke else 3), run.smoke)
    except CheckoutError as err:
        print(f"compare_lifelong_vdm: {err}", file=sys.stderr)
        return 2
    text = markdown(result)
    print(text)
    if run.out:
        run.out.parent.mkdir(parents=True, exist_ok=True)
        run.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        run.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
