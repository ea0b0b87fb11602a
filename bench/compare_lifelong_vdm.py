"""Time the paper's reference implementation against fastdiff on the same stream and batch.

The reference is plai-group/lifelong-vdm (FDM U-Net video model, pixel space), imported from a checkout the
user points at; none of its code is copied here. Both sides take the paper's Balls step: batch 2 windows of
K = 10 frames (1 live + 1 replayed), first 5 frames observed, eps-prediction MSE on the other 5, linear
1000-step schedule, AdamW lr 1e-4 / weight decay 1e-5, one step per frame of the generated balls stream.

  reference   UNetVideoModel (image_size 32, num_channels 64, num_res_blocks 1: the README's balls command),
              its forward(x, x0=, timesteps=, frame_indices=, obs_mask=, latent_mask=), noised here with the
              same schedule, torch AdamW; fp32 as it trains by default
  fastdiff    the trainer's step in pixel space at the same batch: eager fp32 AdamW, and the fast path
              (bf16, fused 8-bit AdamW, compiled, one CUDA graph) where a GPU is present

    git clone https://github.com/plai-group/lifelong-vdm ../lifelong-vdm
    python bench/compare_lifelong_vdm.py --repo ../lifelong-vdm [--steps 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import make_trainer, measure  # noqa: E402

from fastdiff.diffusion import Schedule  # noqa: E402
from fastdiff.streams import make_stream  # noqa: E402

WINDOW, OBSERVED, BATCH = 10, 5, 2


def load_reference(repo: Path):
    if not (repo / "improved_diffusion" / "script_util.py").exists():
        raise FileNotFoundError(f"--repo {repo}: not a lifelong-vdm checkout (no improved_diffusion/script_util.py)")
    sys.path.insert(0, str(repo))
    from improved_diffusion import script_util

    settings = script_util.model_and_diffusion_defaults("unet")
    settings.update(image_size=32, num_channels=64, num_res_blocks=1)
    model, _ = script_util.create_model_and_diffusion("unet", **settings)
    return model


def reference_step_time(model, device, steps: int, warmup: int = 3) -> dict:
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    schedule = Schedule.make("linear", 1000, device)
    stream = make_stream("balls-o", total_frames=10**6)
    frames = torch.from_numpy(stream.read(steps + warmup + WINDOW)).to(device).float().div(127.5).sub(1)
    frames = frames.permute(0, 3, 1, 2)  # (N, 3, 32, 32)
    obs = (torch.arange(WINDOW, device=device) < OBSERVED).float().view(1, WINDOW, 1, 1, 1)
    obs = obs.expand(BATCH, -1, -1, -1, -1)
    frame_indices = torch.arange(WINDOW, device=device).expand(BATCH, WINDOW)

    def step(i: int) -> None:
        live = frames[i:i + WINDOW]
        replay = frames[torch.randint(0, i + 1, ()).item():][:WINDOW]  # a past window, as a buffer would give
        x0 = torch.stack([live, replay])
        t = torch.randint(0, 1000, (BATCH,), device=device)
        noise = torch.randn_like(x0)
        a, s = schedule.alpha[t].view(-1, 1, 1, 1, 1), schedule.sigma[t].view(-1, 1, 1, 1, 1)
        x_t = a * x0 + s * noise
        out, _ = model(x_t, x0=x0, timesteps=t, frame_indices=frame_indices, obs_mask=obs, latent_mask=1 - obs)
        loss = ((out - noise) ** 2 * (1 - obs)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"frames/s": round(steps / seconds, 2), "ms_per_step": round(1e3 * seconds / steps, 3),
            "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "peak_memory_MiB": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
            else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="path to a plai-group/lifelong-vdm checkout")
    parser.add_argument("--steps", type=int, default=None, help="steps timed (default 200 on a GPU, 3 on a CPU)")
    parser.add_argument("--preset", default="small", help="fastdiff model preset for its side (default small)")
    parser.add_argument("--out", default=None, help="rows .json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (200 if device.type == "cuda" else 3)
    try:
        reference = load_reference(Path(args.repo))
    except (FileNotFoundError, ImportError) as err:
        print(f"compare_lifelong_vdm: {err}", file=sys.stderr)
        return 2
    base = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "batch": BATCH, "window": WINDOW, "steps": steps}
    rows = [{**base, "impl": "lifelong-vdm U-Net (reference)", **reference_step_time(reference, device, steps)}]
    ours = {"fastdiff eager fp32 adamw": {"run.precision": "fp32", "optim.name": "adamw"}}
    if device.type == "cuda":
        ours["fastdiff fast path"] = {"run.precision": "bf16", "optim.name": "adamw8bit-fused", "run.compile": "true",
                                      "run.step": "graph"}
    for name, overrides in ours.items():
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(args.preset, device, {**overrides, "autoencoder.latent": "none",
                                                        "model.patch": "4"}, Path(tmp) / "run")
            row = {**base, "impl": name, **measure(trainer, steps, warmup=6 if device.type == "cuda" else 1),
                   "parameters_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2)}
        rows.append(row)
    reference_fps = rows[0]["frames/s"]
    for row in rows:
        row["speedup_vs_reference"] = round(row["frames/s"] / reference_fps, 3)
        print("  ".join(f"{k}={v}" for k, v in row.items() if k != "date"))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
