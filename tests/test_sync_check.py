"""Host syncs and capture hazards caught on a CPU (fastdiff/sync_check.py): the checkers themselves, the
sync-free step under them with and without torch.compile, and mutations that put a hazard into the step and
must make the checks fail."""

import pytest
import torch
from test_train import _cfg

import fastdiff.step as step_module
from fastdiff.sync_check import CaptureAudit, HostSyncError, NoHostSync, replay_hazards, unchecked
from fastdiff.train import OnlineTrainer

QUIET = lambda *_, **__: None  # noqa: E731

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the checkers on plain ops ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sync", [
    ("item", lambda x: x.sum().item()),
    ("float", lambda x: float(x.sum())),
    ("bool", lambda x: bool(x.sum() > 0)),
    ("if", lambda x: 1 if x.max() > 0 else 0),
    ("format", lambda x: f"{x.sum():.3f}"),
    ("nonzero", lambda x: x.nonzero()),
    ("where", lambda x: torch.where(x > 0)),
    ("mask", lambda x: x[x > 0]),
    ("masked_put", lambda x: x.clone().__setitem__(x > 0, 0.0)),
    ("masked_select", lambda x: x.masked_select(x > 0)),
    ("unique", lambda x: torch.unique(x)),
    ("equal", lambda x: torch.equal(x, x)),
    ("host data", lambda x: x + torch.tensor([1.0, 2.0]).repeat(8)),
])
def test_no_host_sync_flags_what_would_sync_a_cuda_stream(name, sync):
    x = torch.randn(16)
    with pytest.raises(HostSyncError), NoHostSync():
        sync(x)


def test_no_host_sync_lets_device_side_work_through():
    x = torch.randn(16)
    with NoHostSync():
        y = torch.where(x > 0, x, 0.0).sum() + x.masked_fill(x < 0, 1.0).mean()
        torch._foreach_mul_([x, x.clone()], y)
        x.clamp(max=float("inf")).cumsum(0)
    assert y.shape == ()


def test_replay_hazards_sees_host_values_rebinding_and_stray_randomness():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.zeros(4)}

    def step(lr, generator=gen):
        noise = torch.randn(4, generator=generator)
        state["w"].add_(noise, alpha=lr)

    def audit(*calls):
        rec = CaptureAudit(generator=gen)
        for kwargs in calls:
            if kwargs.pop("rebind", False):  # between steps, outside them: what a graph would never see
                state["w"] = state["w"].clone()
            with rec:
                rec.new_step()
                step(**kwargs)
        return rec.steps

    same = audit({"lr": 0.1}, {"lr": 0.1})
    assert replay_hazards(*same) == []
    assert any("host values" in p for p in replay_hazards(*audit({"lr": 0.1}, {"lr": 0.2})))
    assert any("other storage" in p for p in replay_hazards(*audit({"lr": 0.1}, {"lr": 0.1, "rebind": True})))
    assert any("default generator" in p
               for p in replay_hazards(*audit({"lr": 0.1, "generator": None}, {"lr": 0.1, "generator": None})))


# --- the online step under them ---------------------------------------------------------------------------------
def _device_trainer(tmp_path, name="run", **extra):
    # with a learning-rate warm-up: its schedule must be a device value too
    cfg = _cfg(tmp_path, run__frames=60, run__step="device", optim__name="adamw8bit-fused", optim__warmup=20, **extra)
    trainer = OnlineTrainer(cfg, tmp_path / name, log=QUIET)
    while trainer.step.calls < 3:  # warm-up steps (compile, optimizer state)
        trainer.advance()
    return trainer


def _persistent(step):
    """Every tensor the step keeps from one step to the next, by name."""
    tensors = {name: getattr(step, name) for name in ("ring", "ring_pixels", "frames", "device_steps",
                                                      "device_skipped", "loss", "grad_norm", "found_inf")}
    tensors.update({f"param.{i}": p for i, p in enumerate(step.params)})
    tensors.update({f"ema.{i}": p for i, p in enumerate(step.ema_params)})
    tensors.update({f"buffer.{k}": getattr(step.buffer, k) for k in ("windows", "starts", "seen")})
    for i, state in enumerate(step.optimizer.state.values()):
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


@pytest.mark.parametrize("compile_model", ["false", "true"])
def test_device_step_never_syncs_and_is_capturable(tmp_path, compile_model):
    if compile_model == "true":
        torch._dynamo.reset()
    trainer = _device_trainer(tmp_path, run__compile=compile_model)
    step = trainer.step
    if compile_model == "true":  # the compiled forward runs outside the checkers (fullgraph: no syncs in it)
        step.train_model = unchecked(step.train_model)
    before = {name: t.data_ptr() for name, t in _persistent(step).items()}
    with NoHostSync():
        for _ in range(4):
            trainer.advance()  # ingest (outside the step) + the step: any host sync raises here
    if compile_model == "false":  # compiled code is opaque to a dispatch mode: its ops cannot be audited one by one
        audit = CaptureAudit(generator=step.generator)
        with audit:
            for _ in range(2):
                audit.new_step()
                step.step()
        assert replay_hazards(*audit.steps) == []
        assert len(audit.steps[0]) > 100  # it did see the step
    after = {name: t.data_ptr() for name, t in _persistent(step).items()}
    assert before == after  # the captured graph would read and write this very storage
    assert step.result().skipped is False and step.steps == step.calls
    if compile_model == "true":
        torch._dynamo.reset()


def test_the_eager_step_syncs_on_purpose(tmp_path):
    """Positive control: the eager reference reads the loss on the host every step, and the checker sees it."""
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=40, optim__name="adamw8bit-fused"), tmp_path / "run",
                            log=QUIET)
    while not trainer.step.ready:
        trainer.advance()
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), NoHostSync():
        trainer.advance()


def test_mutation_an_item_in_the_step_fails_the_check(tmp_path, monkeypatch):
    trainer = _device_trainer(tmp_path)
    real = step_module.OnlineStep._update_ema

    def ema_with_a_host_read(self, finite):
        if finite.item():  # what the fix removed: a host read of a device value
            real(self, finite)

    monkeypatch.setattr(step_module.OnlineStep, "_update_ema", ema_with_a_host_read)
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), NoHostSync():
        trainer.advance()


@pytest.mark.parametrize("hazard", ["host learning rate", "default generator"])
def test_mutation_host_values_and_stray_randomness_are_replay_hazards(tmp_path, monkeypatch, hazard):
    trainer = _device_trainer(tmp_path)
    step = trainer.step
    real_body = step_module.OnlineStep._body
    count = {"n": 0}

    def mutated_body(self):
        count["n"] += 1
        if hazard == "host learning rate":  # a schedule decided on the host: a graph would keep the first value
            for group in self.optimizer.param_groups:
                group["lr"] = 1e-4 * count["n"]
        else:  # randomness from the default generator, not the one the graph registers
            torch.randn(1)
        real_body(self)

    monkeypatch.setattr(step_module.OnlineStep, "_body", mutated_body)
    audit = CaptureAudit(generator=step.generator)
    with audit:
        for _ in range(2):
            audit.new_step()
            step.step()
    problems = replay_hazards(*audit.steps)
    expected = "host" if hazard == "host learning rate" else "default generator"
    assert any(expected in p for p in problems), problems
