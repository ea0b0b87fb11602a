"""bench/compare_lifelong_vdm.py against checkouts made here: a tiny stand-in of lifelong-vdm's improved_diffusion
package (the functions and classes the script uses, with the real ones' signatures, and the real one's refusal
of diffusion_space None) runs end to end; broken checkouts exit 2 with one line that names what is missing."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "compare_lifelong_vdm.py"

FAKE = {
    "__init__.py": "",
    # imports the optional packages the real one imports: absent here, the script stands them in
    "logger.py": """
        from mpi4py import MPI

        class Logger:
            def __init__(self):
                self.comm = MPI.COMM_WORLD
                self.name2val = {}

            def logkv(self, key, val, distributed=True):
                self.name2val[key] = val

            def logkv_mean(self, key, val):
                self.name2val[key] = val

        logger = Logger()
    """,
    "dist_util.py": """
        import torch

        def dev():
            return torch.device("cpu")
    """,
    "gaussian_diffusion.py": """
        import torch

        class GaussianDiffusion:
            def __init__(self, diffusion_space_kwargs):
                space = diffusion_space_kwargs.get("diffusion_space")
                if space != "pixel":  # as the real setup_enc_dec refuses the defaults' None
                    raise ValueError(f"Unknown diffusion space: {space}")
                self.num_timesteps = 1000

            def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, latent_mask=None,
                                eval_mask=None):
                out, _ = model(x_start + noise, timesteps=t.float(), **model_kwargs)
                return {"loss": (((out - noise) ** 2) * latent_mask).mean(dim=(1, 2, 3, 4))}
    """,
    "unet.py": """
        import torch

        class UNetVideoModel(torch.nn.Module):
            def __init__(self, in_channels, model_channels):
                super().__init__()
                self.conv = torch.nn.Conv2d(in_channels + 1, in_channels, 3, padding=1)

            def forward(self, x, *, x0, timesteps, frame_indices=None, obs_mask=None, latent_mask=None):
                b, t, c, h, w = x.shape
                inp = torch.cat([x * (1 - obs_mask) + x0 * obs_mask, obs_mask.expand(b, t, 1, h, w)], dim=2)
                return self.conv(inp.flatten(0, 1)).view(b, t, c, h, w), None
    """,
    "script_util.py": """
        from .gaussian_diffusion import GaussianDiffusion
        from .unet import UNetVideoModel

        def model_and_diffusion_defaults(model_type="unet"):
            return dict(image_size=64, in_channels=3, num_channels=128, num_res_blocks=2,
                        diffusion_space_kwargs=dict(diffusion_space=None, pre_encoded=False, enable_decoding=False))

        def create_model_and_diffusion(model_type="unet", *, image_size, in_channels, num_channels, num_res_blocks,
                                       diffusion_space_kwargs):
            assert image_size == 32, image_size
            return UNetVideoModel(in_channels, num_channels), GaussianDiffusion(diffusion_space_kwargs)
    """,
    "resample.py": """
        import torch

        class UniformSampler:
            def __init__(self, diffusion):
                self.diffusion = diffusion

            def sample(self, batch_size, device):
                return torch.randint(0, 1000, (batch_size,), device=device), torch.ones(batch_size, device=device)

        def create_named_schedule_sampler(name, diffusion):
            return UniformSampler(diffusion)
    """,
    "train_util.py": """
        import copy

        import blobfile
        import torch
        import torch.distributed as dist
        import wandb

        from . import dist_util
        from .logger import logger

        class TrainLoop:
            def __init__(self, *, model, diffusion, data, batch_size, lr, ema_rate, log_interval, save_interval,
                         use_fp16, diffusion_space_kwargs, fp16_scale_growth, schedule_sampler, weight_decay,
                         lr_anneal_steps, sample_interval, pad_with_random_frames, max_frames, enc_dec_chunk_size,
                         steps_per_experience, masking_mode, args, clip_grad=None, optimizer="adam",
                         distill_weight=0.0):
                assert dist.get_world_size() == 1 and args.resume_id
                self.model, self.diffusion, self.sampler = model, diffusion, schedule_sampler
                self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
                self.ema = copy.deepcopy(list(model.parameters()))
                self.rate = float(ema_rate)
                self.step = 0

            def run_step(self, batch1, batch2, absolute_index_map=None):
                b, t = batch1.shape[:2]
                obs = (torch.arange(t) < t // 2).float().view(1, t, 1, 1, 1).expand(b, t, 1, 1, 1)
                steps, weights = self.sampler.sample(b, dist_util.dev())
                kwargs = {"x0": batch1, "obs_mask": obs, "latent_mask": 1 - obs,
                          "frame_indices": torch.stack(absolute_index_map)}
                losses = self.diffusion.training_losses(self.model, batch1, steps, model_kwargs=kwargs,
                                                        noise=torch.randn_like(batch1), latent_mask=1 - obs)
                self.opt.zero_grad()
                (losses["loss"] * weights).mean().backward()
                logger.logkv_mean("loss", losses["loss"].mean().item())
                self.opt.step()
                with torch.no_grad():
                    for e, p in zip(self.ema, self.model.parameters()):
                        e.mul_(self.rate).add_(p, alpha=1 - self.rate)
    """,
}


def make_checkout(root: Path, drop: str | None = None, replace: dict[str, str] | None = None) -> Path:
    package = root / "improved_diffusion"
    package.mkdir(parents=True)
    for name, text in {**FAKE, **(replace or {})}.items():
        if name != drop:
            (package / name).write_text(textwrap.dedent(text))
    return root


def run(repo: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--repo", str(repo), "--device", "cpu", "--smoke", *extra],
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    message = [line for line in done.stderr.splitlines() if line.startswith("compare_lifelong_vdm:")]
    assert len(message) == 1, done.stderr
    for word in words:
        assert word in message[0], message[0]


def test_runs_end_to_end_against_a_tiny_checkout(tmp_path):
    repo = make_checkout(tmp_path / "lifelong-vdm")
    out = tmp_path / "result.json"
    done = run(repo, "--repeats", "2", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    names = [r["impl"] for r in result["rows"]]
    assert names == ["lifelong-vdm U-Net", "fastdiff small (pixel, patch 4)", "fastdiff tiny (latent)"]
    assert all(r["median_ms_per_step"] > 0 and r["steps_timed"] == 2 and r["parameters"] > 0 for r in result["rows"])
    assert result["rows"][0]["reference_time_ratio"] == 1.0
    # the optional packages the checkout imports are absent here: stood in, and said so
    assert {s.split()[0] for s in result["stand_ins"]} >= {"mpi4py", "blobfile", "wandb"}
    assert "stand-ins" in done.stdout and out.with_suffix(".md").read_text().startswith("# lifelong-vdm vs fastdiff")


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
    assert_refused(run(tmp_path), "not a lifelong-vdm checkout", "improved_diffusion/script_util.py")


def test_a_missing_file_is_named(tmp_path):
    repo = make_checkout(tmp_path / "repo", drop="train_util.py")
    assert_refused(run(repo), "missing improved_diffusion/train_util.py")


def test_a_missing_function_is_named(tmp_path):
    script_util = FAKE["script_util.py"].replace("def create_model_and_diffusion(", "def create_model(")
    repo = make_checkout(tmp_path / "repo", replace={"script_util.py": script_util})
    assert_refused(run(repo), "has no create_model_and_diffusion")


def test_a_missing_dependency_is_named(tmp_path):
    unet = "import lifelong_vdm_dependency_not_installed\n" + textwrap.dedent(FAKE["unet.py"])
    repo = make_checkout(tmp_path / "repo", replace={"unet.py": unet})
    assert_refused(run(repo), "needs 'lifelong_vdm_dependency_not_installed'")


@pytest.mark.parametrize("broken", ["TrainLoop(", "run_step("])
def test_an_api_that_changed_is_one_line_naming_where(tmp_path, broken):
    """Their TrainLoop taking other arguments, or its step failing: one line with the checkout's file and line."""
    train_util = FAKE["train_util.py"]
    if broken == "TrainLoop(":
        train_util = train_util.replace("def __init__(self, *, model,", "def __init__(self, *, network,")
    else:
        train_util = train_util.replace("b, t = batch1.shape[:2]", "b, t = batch1.shape[:2]; {}['obs']")
    repo = make_checkout(tmp_path / "repo", replace={"train_util.py": train_util})
    done = run(repo)
    assert_refused(done, "lifelong-vdm at")
    if broken == "run_step(":
        assert "improved_diffusion/train_util.py:" in done.stderr and "KeyError" in done.stderr
