"""Data-parallel training (fastdiff/distributed.py) on CPU with the gloo backend and 2 processes.

* 2 ranks == one process stepping on the concatenated effective batch (losses and parameters);
* the sharded reservoir is exactly the single-process reservoir, and reshards to any number of ranks;
* `torchrun ... -m fastdiff train` works, and its 2-rank checkpoint resumes on 1 rank;
* unsupported combinations are refused with the reason.
"""

import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdiff import distributed, ops
from fastdiff.config import build_config
from fastdiff.diffusion import frame_weights, observed_frames, sample_training_levels, training_stagger
from fastdiff.distributed import DistributedError, World
from fastdiff.replay import ReplayBuffer, merge_shards
from fastdiff.train import OnlineTrainer, rank_view

# Tiny and quick: 2 blocks of 64, a 5-step autoencoder fit, 2-step sampling. paper_pattern_prob=1: every
# window has its first K/2 frames observed, so each rank's loss averages the same number of frames and
# "mean of the per-rank losses" (what DDP's gradient averaging optimises) is exactly the mean over the
# concatenated batch (the single-process loss). Learned positions (a parameter the resume test watches move)
# and no learning-rate warm-up or cool-down (the single-process reference steps at a constant lr).
TINY = {
    "model.width": "64", "model.depth": "2", "model.heads": "2",
    "autoencoder.latent": "ae", "model.patch": "1", "model.pos_embed": "learned", "optim.warmup": "0",
    "optim.cooldown": "0", "autoencoder.warmup_frames": "24", "autoencoder.fit_steps": "5",
    "autoencoder.fit_batch": "8",
    "autoencoder.hidden": "16", "replay.replayed": "2", "replay.windows": "3",
    "diffusion.paper_pattern_prob": "1.0", "diffusion.sample_steps": "2", "run.sample_every": "0",
    "run.final_clips": "0",
    "run.sample_frames": "12", "run.checkpoint_every": "1000", "run.log_every": "5", "run.progress": "false",
    "run.device": "cpu", "optim.name": "adamw", "optim.lr": "1e-3",
}


def _cfg(out, **extra):
    return build_config("tiny", None, {**TINY, "run.out": str(out), **extra})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int) -> dict:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


# --- 2 ranks against one process ---------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, tmp: str, frames: int) -> None:
    os.environ.update(_env(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        trainer = OnlineTrainer(_cfg(tmp, **{"run.frames": str(frames)}), os.path.join(tmp, "run"))
        record = {"init": {k: v.clone() for k, v in trainer.step.model.state_dict().items()},
                  "batches": [], "gen_states": [], "losses": []}
        make_batch, step = trainer.step.batch, trainer.step.step

        def recording_batch(live):  # what this rank trains on, and its RNG state for the noise draws
            batch = make_batch(live)
            record["batches"].append(batch.clone())
            record["gen_states"].append(trainer.step.generator.get_state())
            return batch

        def recording_step():
            step()
            record["losses"].append(trainer.step.result().loss)

        trainer.step.batch, trainer.step.step = recording_batch, recording_step
        trainer.train()
        record["final"] = {k: v.clone() for k, v in trainer.step.model.state_dict().items()}
        record["ema"] = {k: v.clone() for k, v in trainer.step.ema.state_dict().items()}
        torch.save(record, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _concat_batch_loss(model, parts, schedule, dcfg):
    """The single-process loss on the effective batch: the ranks' clips, noise levels and noise (each drawn
    from that rank's generator exactly as training_loss draws them), concatenated into one forward."""
    xs, ts, observed, targets = [], [], [], []
    for x0, state in parts:
        g = torch.Generator().manual_seed(0)
        g.set_state(state)
        t, obs = sample_training_levels(x0.shape[0], x0.shape[1], schedule.timesteps, dcfg.paper_pattern_prob,
                                        g, x0.device, observed_frames(dcfg, x0.shape[1]),
                                        training_stagger(dcfg))
        x_t, target = ops.add_noise(x0, t, obs, schedule.alpha, schedule.sigma, generator=g,
                                    prediction=dcfg.prediction)
        xs.append(x_t), ts.append(t), observed.append(obs), targets.append(target)
    t, obs = torch.cat(ts), torch.cat(observed)
    pred = model(torch.cat(xs), t.float(), obs)
    return ops.frame_mse_loss(pred, torch.cat(targets), frame_weights(t, schedule, dcfg), obs)


@pytest.mark.timeout(180)
def test_two_ranks_match_one_process_on_the_effective_batch(tmp_path):
    frames, world = 15, 2  # K = 10: 6 steps
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), frames), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    steps = frames - 10 + 1
    assert all(len(r["losses"]) == steps for r in ranks)
    # every rank: the same live window, its own replay draws and noise
    for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert torch.equal(a[:1], b[:1])
    assert any(not torch.equal(a[1:], b[1:]) for a, b in zip(ranks[0]["batches"][2:], ranks[1]["batches"][2:]))
    assert not torch.equal(ranks[0]["gen_states"][0], ranks[1]["gen_states"][0])
    # DDP kept the replicas identical, bit for bit
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key

    # one process, one step per frame on the concatenated batch, from the same initial parameters
    ref = OnlineTrainer(_cfg(tmp_path, **{"run.frames": str(frames)}), tmp_path / "ref", log=lambda *_: None)
    ref.step.model.load_state_dict(ranks[0]["init"])
    ref.step.ema.load_state_dict(ranks[0]["init"])
    losses = []
    for step in range(steps):
        parts = [(r["batches"][step], r["gen_states"][step]) for r in ranks]
        loss = _concat_batch_loss(ref.step.model, parts, ref.step.schedule, ref.cfg.diffusion)
        ref.step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.step.model.parameters(), ref.cfg.optim.grad_clip)
        ref.step.optimizer.step()
        decay = min(ref.cfg.optim.ema, (2 + step) / (11 + step))  # the EMA warm-up, counting this step
        torch._foreach_lerp_(list(ref.step.ema.parameters()), list(ref.step.model.parameters()), 1.0 - decay)
        losses.append(float(loss.detach()))
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    moved = 0
    for key, value in ref.step.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["final"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, ranks[0]["init"][key])
    assert moved > 0  # training moved the parameters: the comparison is not init against init
    for key, value in ref.step.ema.state_dict().items():
        torch.testing.assert_close(ranks[0]["ema"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# --- the sharded reservoir ---------------------------------------------------------------------------
def _shards(world, capacity, seed, mode="reservoir"):
    return [ReplayBuffer(capacity, (1,), dtype=torch.float32, device="cpu", mode=mode, shard=(r, world),
                         insert_seed=seed) for r in range(world)]


@pytest.mark.parametrize("mode", ["reservoir", "full"])
def test_shards_together_are_the_single_process_reservoir(mode):
    capacity, n = 7, 60 if mode == "reservoir" else 7
    single = ReplayBuffer(capacity, (1,), dtype=torch.float32, device="cpu", mode=mode)
    g = torch.Generator().manual_seed(3)
    shards = _shards(3, capacity, 3, mode)
    for i in range(n):
        single.insert(torch.tensor([float(i)]), i, g)
        for s in shards:
            s.insert(torch.tensor([float(i)]), i, None)
        merged = merge_shards([s.state_dict() for s in shards])
        assert torch.equal(merged["windows"], single.state_dict()["windows"]), i  # the same slots, every step
    assert [int(s.filled()) for s in shards] == [3, 2, 2]
    assert mode == "full" or merged["windows"].max() >= capacity  # later windows did replace early ones


def test_reservoir_reshards_to_any_number_of_ranks():
    shards = _shards(2, 9, 0)
    for i in range(40):
        for s in shards:
            s.insert(torch.tensor([float(i)]), i, None)
    merged = merge_shards([s.state_dict() for s in shards])
    for world in (1, 3, 4):  # load the 2-rank reservoir on other world sizes: same global content
        new = _shards(world, 9, 1)
        for s in new:
            s.load_state_dict(merged)
        again = merge_shards([s.state_dict() for s in new])
        assert torch.equal(again["windows"], merged["windows"]) and torch.equal(again["starts"], merged["starts"])
        assert all(int(s.seen) == 40 for s in new)
        assert torch.equal(new[0].insert_generator.get_state(), shards[0].insert_generator.get_state())
    plain = ReplayBuffer(9, (1,), dtype=torch.float32, device="cpu")  # one process loads it as it is
    plain.load_state_dict(merged)
    assert torch.equal(plain.windows[:9], merged["windows"])


def test_samples_only_filled_slots_of_its_shard():
    shards = _shards(2, 8, 0)
    for i in range(3):  # global slots 0, 1, 2: rank 0 holds 0 and 2, rank 1 holds 1
        for s in shards:
            s.insert(torch.full((1,), float(i)), i, None)
    g = torch.Generator().manual_seed(0)
    assert set(shards[0].sample(200, g, torch.zeros(1))[:, 0].tolist()) == {0.0, 2.0}
    assert set(shards[1].sample(200, g, torch.zeros(1))[:, 0].tolist()) == {1.0}


# --- torchrun end to end, then resume on one rank ----------------------------------------------------
def _torchrun(*args: str) -> subprocess.CompletedProcess:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "fastdiff", "train", *args]
    done = subprocess.run(cmd, env={**os.environ, **_env(port)}, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _checkpoint(run_dir, frame: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"ckpt_{frame:010d}.pt", weights_only=False)


@pytest.mark.timeout(300)
def test_torchrun_checkpoint_resumes_on_two_ranks_and_on_one(tmp_path):
    sets = ["--preset", "tiny", *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]  # as _cfg builds
    done = _torchrun("--out", str(tmp_path), "--name", "r", "--frames", "13", *sets)
    assert done.stdout.count("run directory:") == 1 and "(2 ranks)" in done.stdout  # rank 0 speaks
    run_dir = tmp_path / "r"

    # same world size: stop at 13, resume to 15 == 15 in one go, bit for bit (per-rank RNG and shards restored)
    shutil.copytree(run_dir, tmp_path / "again")
    _torchrun("--resume", str(tmp_path / "again"), "--frames", "15")
    _torchrun("--out", str(tmp_path), "--name", "straight", "--frames", "15", *sets)
    resumed, straight = _checkpoint(tmp_path / "again", 15), _checkpoint(tmp_path / "straight", 15)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(straight["buffer"]["windows"], resumed["buffer"]["windows"])
    assert not torch.equal(straight["model"]["pos"], _checkpoint(run_dir, 13)["model"]["pos"])

    # one rank: the whole reservoir and rank 0's RNG stream
    state = _checkpoint(run_dir, 13)
    saved = state["distributed"]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    shard0, shard1 = (p["buffer"] for p in saved["ranks"])
    assert torch.equal(state["buffer"]["windows"][0::2], shard0["windows"])
    assert torch.equal(state["buffer"]["windows"][1::2], shard1["windows"])
    assert int(state["buffer"]["seen"]) == 4 and state["buffer"]["windows"].shape[0] == 3

    resumed = OnlineTrainer(_cfg(tmp_path, **{"run.frames": "15"}), run_dir, resume=True, log=lambda *_: None)
    assert resumed.world.size == 1 and resumed.frames_seen == 13 and resumed.steps == 4
    for key, value in resumed.step.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert torch.equal(resumed.step.buffer.windows[:3], state["buffer"]["windows"])  # the whole reservoir, on one rank
    assert torch.equal(resumed.step.generator.get_state(), saved["ranks"][0]["generator"])
    summary = resumed.train()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and int(resumed.step.buffer.seen) == 6


# --- refusals ----------------------------------------------------------------------------------------
def test_refuses_unsupported_combinations(tmp_path):
    cfg = _cfg(tmp_path, **{"run.streams": "balls-o;balls-c;maze"})
    with pytest.raises(DistributedError, match="3 streams for 2 rank"):
        World(rank=0, size=2).check(cfg)
    cfg = _cfg(tmp_path)
    cfg.run.step = "graph"  # DDP + the captured step is refused with why
    with pytest.raises(DistributedError, match="captured-graph fast path does not run under DDP"):
        World(rank=1, size=2).check(cfg)
    World().check(cfg)  # one process: the fast path is not our business
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        ReplayBuffer(3, (1,), dtype=torch.float32, device="cpu", shard=(0, 4), insert_seed=0)


def test_per_rank_streams_resume_only_on_as_many_ranks():
    state = {"rng": {"generator": torch.Generator().get_state()}, "counters": {"frames_seen": 5},
             "config": {"run": {"seed": 0}},
             "distributed": {"world_size": 2, "streams": ["balls-o", "maze"], "ranks": [{}, {}]}}
    with pytest.raises(DistributedError, match="one rank per stream"):
        rank_view(state, World(), None, "cpu")
    # one shared stream: a new rank gets a fresh RNG stream, the others continue theirs
    state["distributed"] = {"world_size": 1, "streams": None, "ranks": [{"generator": state["rng"]["generator"]}]}
    one = rank_view(state, World(rank=1, size=2), None, "cpu")
    assert not torch.equal(one["rng"]["generator"], state["rng"]["generator"])
    assert torch.equal(rank_view(state, World(rank=0, size=2), None, "cpu")["rng"]["generator"],
                       state["rng"]["generator"])


def test_seeds_differ_per_rank_and_rank0_keeps_the_run_seed():
    assert World(rank=0, size=4).rank_seed(7) == 7
    seeds = {World(rank=r, size=4).rank_seed(7) for r in range(4)}
    assert len(seeds) == 4
    assert distributed.derive_seed(7, 1) == distributed.derive_seed(7, 1) != distributed.derive_seed(8, 1)


@pytest.mark.timeout(240)
def test_torchrun_one_stream_per_rank(tmp_path):
    sets = ["--preset", "tiny", *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]  # as _cfg builds
    _torchrun("--out", str(tmp_path), "--name", "s", "--frames", "12", "--streams", "balls-o", "balls-c", *sets)
    state = _checkpoint(tmp_path / "s", 12)
    saved = state["distributed"]
    assert saved["streams"] == ["balls-o", "balls-c"]
    rank0, rank1 = saved["ranks"]
    assert not torch.equal(rank0["ring_pixels"], rank1["ring_pixels"])  # each rank trained on its own stream
    assert rank0["buffer"]["capacity"] == rank1["buffer"]["capacity"] == 3  # a whole buffer each, not a shard
    assert int(rank1["buffer"]["seen"]) == 3
    with pytest.raises(DistributedError, match="one rank per stream"):
        OnlineTrainer(_cfg(tmp_path, **{"run.frames": "14"}), tmp_path / "s", resume=True, log=lambda *_: None)
