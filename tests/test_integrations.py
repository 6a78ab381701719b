"""Trainers and wrappers driving FusedSAM: real frameworks, tiny models, a few CPU steps.

Each test counts forward passes per optimizer step (2 for SAM) and compares the final weights
with the plain ``first_step`` / ``second_step`` loop on the same data.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from helpers import state_tensors
from torch import nn
from torch.nn import functional as nnf
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from fused_sam import FusedSAM
from fused_sam.integrations import unwrap_sam

N, D, C = 16, 6, 3  # examples, features, classes


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


class Net(nn.Module):
    """A tiny classifier that counts its forward passes; returns HF-style outputs on request."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
        self.forwards = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self.forwards += 1
        logits = self.body(x)
        if labels is None:
            return logits
        return {"loss": nnf.cross_entropy(logits, labels), "logits": logits}


def _sam(model: nn.Module, **kw) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)


def _reference_run(steps: int, batches, clip: float | None = None, autocast=None) -> Net:
    """The plain two-step loop: the oracle of every trainer test."""
    model = Net()
    opt = _sam(model, backend="reference")
    for step in range(steps):
        x, y = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            nnf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            nnf.cross_entropy(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
    return model


def _close(a: nn.Module, b: nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its configuration and its accumulation state in process-wide
    singletons (HF Trainer too): each test gets fresh ones, so runs with different mixed
    precision or accumulation do not collide."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()  # an accumulation window a test left open


def _count_steps(opt: FusedSAM) -> list[int]:
    steps: list[int] = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    return steps


# ---------------------------------------------------------------------------------------------
# Core semantics the integrations rely on


def test_closure_as_second_pass_while_in_flight() -> None:
    x, y = _data()
    model, ref = Net(), _reference_run(1, [_data()])
    opt = _sam(model, backend="reference")
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)

    def closure():
        opt.zero_grad()
        loss = nnf.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)  # in flight: the closure is the second pass only
    assert model.forwards == 2 and not opt.in_flight and loss is not None
    _close(model, ref)


def test_step_closure_records_sharpness() -> None:
    x, y = _data()
    model = Net()
    opt = _sam(model)
    losses = []

    def closure():
        opt.zero_grad()
        loss = nnf.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss

    assert opt.sharpness is None
    opt.step(closure)
    assert torch.equal(opt.sharpness, losses[1] - losses[0]) and opt.sharpness > 0


def test_closure_accumulating_onto_old_gradients_raises() -> None:
    x, y = _data()
    model = Net()
    opt = _sam(model)
    nnf.cross_entropy(model(x[:8]), y[:8]).backward()  # an earlier micro-batch
    before = [p.detach().clone() for p in model.parameters()]

    def accumulating():
        loss = nnf.cross_entropy(model(x[8:]), y[8:])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="accumulat"):
        opt.step(accumulating)
    assert not opt.in_flight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)

    def zeroing_in_place():  # torch's convention, without set_to_none: no false alarm
        opt.zero_grad(set_to_none=False)
        loss = nnf.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(zeroing_in_place)
    opt.step(zeroing_in_place)
    assert not opt.in_flight


def test_unwrap_sam() -> None:
    model = Net()
    opt = _sam(model)
    assert unwrap_sam(opt) is opt

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_sam(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="no FusedSAM"):
        unwrap_sam(torch.optim.SGD(model.parameters(), lr=0.1))


def test_compiled_step_leaves_the_optimizer_idle() -> None:
    """``torch.compile(opt.step)``: the step's bookkeeping lives in one mutated object, which
    compiled code updates like eager code."""
    x, y = _data()
    model, ref = Net(), _reference_run(2, [_data()])
    opt = _sam(model, backend="foreach")
    step = torch.compile(opt.step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph-break notices
        for _ in range(2):
            nnf.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nnf.cross_entropy(model(x), y).backward()
            step()
            assert not opt.in_flight
            opt.zero_grad()
    _close(model, ref)


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer


class _HFData(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": N,
        "max_steps": 3,
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return TrainingArguments(**{**base, **kw})


def _sam_trainer(tmp_path, model, opt, **kw):
    from fused_sam.integrations.transformers import SAMTrainer

    class InOrder(SAMTrainer):  # the oracle loop sees the examples in order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrder(
        model=model, args=_hf_args(tmp_path, **kw), train_dataset=_HFData(), optimizers=(opt, None)
    )


def test_hf_trainer_plain_fusedsam_fails_loudly(tmp_path) -> None:
    """Trainer runs one backward per step; FusedSAM must not quietly train plain SGD."""
    from transformers import Trainer

    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        model=model,
        args=_hf_args(tmp_path),
        train_dataset=_HFData(),
        optimizers=(_sam(model), None),
    )
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        trainer.train()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_hf_sam_trainer_matches_the_two_step_loop(tmp_path, clip: float) -> None:
    model = Net()
    opt = _sam(model)
    steps = _count_steps(opt)
    trainer = _sam_trainer(tmp_path, model, opt, max_grad_norm=clip)
    out = trainer.train()
    assert len(steps) == 3 and model.forwards == 2 * 3
    assert trainer.state.global_step == 3 and out.training_loss > 0
    assert opt.sharpness is not None
    _close(model, _reference_run(3, [_data()], clip=clip or None))


def test_hf_sam_trainer_linear_schedule(tmp_path) -> None:
    """The Trainer's own LR schedule runs on FusedSAM (no "scheduler before optimizer"
    warning: the suite turns it into an error) and matches the plain loop under it."""
    model = Net()
    opt = _sam(model)
    trainer = _sam_trainer(tmp_path, model, opt, lr_scheduler_type="linear", max_steps=4)
    trainer.train()
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # decayed to 0 at the last step
    ref = Net()
    ref_opt = _sam(ref, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: (4 - step) / 4)
    x, y = _data()
    for _ in range(4):
        nnf.cross_entropy(ref(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        nnf.cross_entropy(ref(x), y).backward()
        ref_opt.second_step(zero_grad=True)
        sched.step()
    _close(model, ref)


def test_hf_sam_trainer_with_a_step_schedule(tmp_path) -> None:
    """EveryK(2): SAM on steps 0 and 2 (two passes), plain on 1 and 3 (one pass)."""
    from fused_sam import EveryK

    model = Net()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                   schedule=EveryK(2))  # fmt: skip
    _sam_trainer(tmp_path, model, opt, max_steps=4).train()
    assert model.forwards == 2 + 1 + 2 + 1
    ref = Net()
    ref_opt = FusedSAM(ref.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       backend="reference", schedule=EveryK(2))  # fmt: skip
    x, y = _data()
    for _ in range(4):
        nnf.cross_entropy(ref(x), y).backward()
        if ref_opt.next_step == "sam":
            ref_opt.first_step(zero_grad=True)
            nnf.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _close(model, ref)


def test_hf_plain_trainer_with_momentum_sam(tmp_path) -> None:
    """Momentum-SAM needs one pass per step: the plain Trainer drives it with no glue."""
    from transformers import Trainer

    from fused_sam import MomentumSAM

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = Net()
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    trainer = InOrder(
        model=model, args=_hf_args(tmp_path), train_dataset=_HFData(), optimizers=(opt, None)
    )
    trainer.train()
    assert model.forwards == 3
    ref = Net()
    ref_opt = MomentumSAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(3):
        nnf.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _close(model, ref)


def test_hf_sam_trainer_bf16(tmp_path) -> None:
    model = Net()
    opt = _sam(model)
    trainer = _sam_trainer(tmp_path, model, opt, bf16=True)
    trainer.train()
    assert model.forwards == 6
    _close(model, _reference_run(3, [_data()], autocast=torch.bfloat16), atol=1e-5, rtol=1e-4)


def test_hf_sam_trainer_accumulation_perturbs_per_micro_batch(tmp_path) -> None:
    """k = 2 micro-batches of 8: each takes its own ascent step; the second-pass gradients of
    both (each scaled by 1/k) drive one base step. Written out here independently."""
    model = Net()
    opt = _sam(model)
    steps = _count_steps(opt)
    trainer = _sam_trainer(
        tmp_path, model, opt, per_device_train_batch_size=8, gradient_accumulation_steps=2
    )
    trainer.train()
    assert len(steps) == 3 and model.forwards == 3 * 2 * 2

    x, y = _data()
    ref = Net()
    params = list(ref.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(3):
        start = (step * 16) % N
        acc = [torch.zeros_like(p) for p in params]
        for mb in range(2):
            xs = x[start + 8 * mb : start + 8 * (mb + 1)]
            ys = y[start + 8 * mb : start + 8 * (mb + 1)]
            g1 = torch.autograd.grad(nnf.cross_entropy(ref(xs), ys) / 2, params)
            norm = torch.cat([g.reshape(-1) for g in g1]).norm()
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, g1):
                    p.add_(0.05 * g / (norm + 1e-12))
            g2 = torch.autograd.grad(nnf.cross_entropy(ref(xs), ys) / 2, params)
            with torch.no_grad():
                for p, b, a, g in zip(params, w, acc, g2):
                    p.copy_(b)
                    a.add_(g)
        for p, a in zip(params, acc):
            p.grad = a
        base.step()
    _close(model, ref)


def test_hf_sam_trainer_save_and_resume(tmp_path) -> None:
    model = Net()
    trainer = _sam_trainer(
        tmp_path / "a", model, _sam(model), max_steps=4, save_strategy="steps", save_steps=2
    )
    trainer.train()
    resumed_model = Net()
    resumed = _sam_trainer(
        tmp_path / "a", resumed_model, _sam(resumed_model), max_steps=4, save_strategy="no"
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    s, t = (
        state_tensors(trainer.optimizer.optimizer, list(model.parameters())),
        state_tensors(resumed.optimizer.optimizer, list(resumed_model.parameters())),
    )
    assert s and all(torch.equal(a, b) for a, b in zip(s, t))


# ---------------------------------------------------------------------------------------------
# Accelerate


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accelerate_two_step_loop(precision: str) -> None:
    from accelerate import Accelerator

    x, y = _data()
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    model = Net()
    prepared_model, opt, loader = accelerator.prepare(
        model, _sam(model), DataLoader(list(zip(x, y)), batch_size=N)
    )
    with pytest.raises(AttributeError):
        opt.first_step  # noqa: B018 (the wrapper does not forward it: hence unwrap_sam)
    sam = unwrap_sam(opt)
    for _ in range(3):
        for xb, yb in loader:
            accelerator.backward(nnf.cross_entropy(prepared_model(xb), yb))
            sam.first_step(zero_grad=True)
            accelerator.backward(nnf.cross_entropy(prepared_model(xb), yb))
            opt.step()
            opt.zero_grad()
    assert model.forwards == 6 and not sam.in_flight
    autocast = torch.bfloat16 if precision == "bf16" else None
    tol = {"atol": 1e-5, "rtol": 1e-4} if autocast else {}
    _close(model, _reference_run(3, [_data()], autocast=autocast), **tol)


# ---------------------------------------------------------------------------------------------
# Lightning


def _lightning_module(manual: bool, model: Net, backend: str = "foreach", schedule: bool = False):
    import lightning.pytorch as pl

    from fused_sam.integrations.lightning import SAMLightningModule

    class Module(pl.LightningModule if manual else SAMLightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            if not manual:
                return nnf.cross_entropy(self.net(xb), yb)
            opt = self.optimizers()
            loss = nnf.cross_entropy(self.net(xb), yb)
            self.manual_backward(loss)
            opt.first_step(zero_grad=True)
            self.manual_backward(nnf.cross_entropy(self.net(xb), yb))
            opt.step()
            opt.zero_grad()
            return loss

        def configure_optimizers(self):
            opt = _sam(self.net, backend=backend)
            if not schedule:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def _lightning_fit(module, ckpt=None, loader=None, **kw):
    import lightning.pytorch as pl

    x, y = _data()
    args = {
        "max_steps": 3,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kw,
    }
    trainer = pl.Trainer(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers and similar advice
        if loader is None:
            loader = DataLoader(list(zip(x, y)), batch_size=N)
        trainer.fit(module, loader, ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("manual", [False, True])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_lightning_matches_the_two_step_loop(manual: bool, precision: str) -> None:
    model = Net()
    trainer = _lightning_fit(_lightning_module(manual, model), precision=precision)
    assert trainer.global_step == 3 and model.forwards == 6
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    tol = {"atol": 1e-5, "rtol": 1e-4} if autocast else {}
    _close(model, _reference_run(3, [_data()], autocast=autocast), **tol)


@pytest.mark.gpu
def test_lightning_automatic_16_mixed_gpu() -> None:
    """16-mixed (a GPU: on CPU Lightning runs bf16) runs pass 2's closure itself and then
    scaler.step(opt), which finishes the SAM step: the two-step loop under a GradScaler."""
    model = Net()
    trainer = _lightning_fit(
        _lightning_module(False, model), precision="16-mixed", accelerator="gpu"
    )
    assert trainer.global_step == 3 and model.forwards == 6
    ref = Net().cuda()
    opt = _sam(ref, backend="reference")
    scaler = torch.amp.GradScaler("cuda")
    x, y = (t.cuda() for t in _data())
    for _ in range(3):
        for _pass in range(2):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nnf.cross_entropy(ref(x), y)
            scaler.scale(loss).backward()
            if _pass == 0:
                opt.first_step(zero_grad=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    _close(model, ref, atol=1e-4, rtol=1e-3)


def test_lightning_automatic_every_k() -> None:
    """A schedule's plain steps run one pass through Lightning (EveryK(2): 2 + 1 + 2 + 1)."""
    from fused_sam import EveryK
    from fused_sam.integrations.lightning import SAMLightningModule

    model = Net()

    class Module(SAMLightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return nnf.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return _sam(self.net, schedule=EveryK(2))

    _lightning_fit(Module(), max_steps=4)
    assert model.forwards == 6
    ref = Net()
    ref_opt = _sam(ref, backend="reference", schedule=EveryK(2))
    x, y = _data()
    for _ in range(4):
        nnf.cross_entropy(ref(x), y).backward()
        if ref_opt.next_step == "sam":
            ref_opt.first_step(zero_grad=True)
            nnf.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _close(model, ref)


def test_lightning_automatic_none_skips_the_step() -> None:
    """training_step returning None skips the step (Lightning's convention) on SAM and plain
    steps alike: EveryK(2) on halves 0, 1, 0, 1 with half 1 skipped is SAM on half 0, then a
    plain step on half 0."""
    from fused_sam import EveryK
    from fused_sam.integrations.lightning import SAMLightningModule

    model = Net()

    class Module(SAMLightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            loss = nnf.cross_entropy(self.net(batch[0]), batch[1])
            return None if batch_idx == 1 else loss

        def configure_optimizers(self):
            return _sam(self.net, schedule=EveryK(2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "training_step returned None"
        _lightning_fit(Module(), loader=_lightning_data(), max_steps=4)
    assert model.forwards == 2 + 1 + 1 + 1
    ref = Net()
    ref_opt = _sam(ref, backend="reference", schedule=EveryK(2))
    x, y = _halves()[0]
    for _ in range(2):
        nnf.cross_entropy(ref(x), y).backward()
        if ref_opt.next_step == "sam":
            ref_opt.first_step(zero_grad=True)
            nnf.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _close(model, ref)


def test_lightning_automatic_clipping() -> None:
    """Lightning clips inside the closure, so both passes; a norm clip does not change the
    SAM direction, so this equals clipping the second pass only."""
    model = Net()
    _lightning_fit(_lightning_module(False, model), gradient_clip_val=0.05)
    _close(model, _reference_run(3, [_data()], clip=0.05))


def _reference_halving_lr(steps: int) -> Net:
    model = Net()
    opt = _sam(model, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    for _ in range(steps):
        nnf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nnf.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    return model


def test_lightning_automatic_scheduler_checkpoint_and_resume(tmp_path) -> None:
    """Automatic optimization with a per-step LR schedule, a checkpoint at step 2 and a resume
    from it: the same weights as the uninterrupted run and as the plain loop."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _lightning_fit(
        _lightning_module(False, model, schedule=True),
        max_steps=4,
        enable_checkpointing=True,
        callbacks=[ckpt],
    )
    _close(model, _reference_halving_lr(4))
    path = str(tmp_path / next(f for f in sorted(os.listdir(tmp_path)) if "step=2" in f))
    resumed = Net()
    trainer = _lightning_fit(
        _lightning_module(False, resumed, schedule=True), ckpt=path, max_steps=4
    )
    assert trainer.global_step == 4 and resumed.forwards == 2 * 2
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lightning_accumulation_raises() -> None:
    x, y = _data()
    import lightning.pytorch as pl

    model = Net()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
    )
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        warnings.simplefilter("ignore")
        trainer.fit(_lightning_module(False, model), DataLoader(list(zip(x, y)), batch_size=8))


def test_lightning_manual_checkpoint_and_resume(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _lightning_fit(
        _lightning_module(True, model), max_steps=4, enable_checkpointing=True, callbacks=[ckpt]
    )
    files = sorted(os.listdir(tmp_path))
    assert any("step=2" in f for f in files), files
    resumed = Net()
    path = str(tmp_path / next(f for f in files if "step=2" in f))
    trainer = _lightning_fit(_lightning_module(True, resumed), ckpt=path, max_steps=4)
    assert trainer.global_step == 4
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# timm


def test_timm_registration_fields_build_fused_sam() -> None:
    """What timm's factory does with an OptimInfo (name lookup after the last '_', momentum
    default, eps/betas dropped when unsupported), applied to our fields; timm itself cannot
    be installed beside torch 2.13.0+cpu (no matching torchvision), see the next test."""
    from fused_sam.integrations.timm import optim_info_fields

    for bad in ("sam_sgd", "", "sam-sgd"):
        with pytest.raises(ValueError, match="letters and digits"):
            optim_info_fields(bad)
    info = optim_info_fields("SAMsgd", torch.optim.SGD, rho=0.1)
    assert info["name"] == "samsgd" and info["has_momentum"] and not info["has_eps"]
    model = Net()
    args = {"weight_decay": 5e-4, "lr": 0.05, "eps": 1e-8, "betas": (0.9, 0.99)}
    if not info["has_eps"]:
        args.pop("eps")
    if not info["has_betas"]:
        args.pop("betas")
    if info["has_momentum"]:
        args.setdefault("momentum", 0.9)
    opt = info["opt_class"](model.parameters(), **args)
    assert isinstance(opt, FusedSAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    adamw = optim_info_fields("samadamw", torch.optim.AdamW)
    assert adamw["has_betas"] and adamw["has_eps"] and not adamw["has_momentum"]


def test_timm_create_optimizer_v2() -> None:
    timm = pytest.importorskip(
        "timm", reason="timm needs a torchvision that imports (the GPU machines have one)"
    )
    from fused_sam.integrations.timm import register

    name = register("samsgd", torch.optim.SGD, rho=0.05)
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.1, weight_decay=5e-4)
    assert isinstance(opt, FusedSAM)
    x, y = _data()
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    look = timm.optim.create_optimizer_v2(Net(), opt=f"lookahead_{name}", lr=0.1)
    assert isinstance(look.base_optimizer if hasattr(look, "base_optimizer") else look, FusedSAM)


# ---------------------------------------------------------------------------------------------
# Every path that runs the second pass for the user does what the two-step loop does: BatchNorm
# statistics from the first pass, L(w) reported, only g2 clipped, nothing trained silently.


class BNNet(Net):
    """:class:`Net` with a BatchNorm layer (``momentum=None``: a cumulative average)."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(D, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(), nn.Linear(8, C)
        )


def _halves() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def _bn_reference(
    steps: int,
    batches,
    freeze: bool = True,
    momentum: float | None = 0.1,
    clip_value: float | None = None,
) -> tuple[Net, list[float]]:
    """The README's two-step loop (``frozen_bn_stats`` around pass 2 unless ``freeze`` is
    off); returns the model and the first-pass losses L(w)."""
    from fused_sam import frozen_bn_stats

    model = BNNet(momentum)
    opt = _sam(model, backend="reference")
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = nnf.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model) if freeze else contextlib.nullcontext():
            nnf.cross_entropy(model(x), y).backward()
        if clip_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), clip_value)
        opt.second_step(zero_grad=True)
    return model, losses


def _same_buffers(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def _lightning_data(batch_size: int = 8) -> DataLoader:
    x, y = _data()
    return DataLoader(list(zip(x, y)), batch_size=batch_size)


def _sam_lightning_module(model: Net, **opt_kw):
    import torchmetrics

    from fused_sam.integrations.lightning import SAMLightningModule

    class Module(SAMLightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.mean_loss = torchmetrics.MeanMetric()
            self.outputs: list[float] = []
            self.second_passes = 0

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = nnf.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.mean_loss.update(loss.detach())
            self.second_passes += self.sam_second_pass
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.outputs.append(outputs["loss"].item())

        def configure_optimizers(self):
            return _sam(self.net, **opt_kw)

    return Module()


def test_lightning_automatic_reports_the_first_pass_and_keeps_bn_stats() -> None:
    """SAMLightningModule: the step's outputs, self.log (step and epoch values, progress bar)
    and a torchmetrics metric see L(w) once per step; BN buffers come from pass 1; the weights
    are the two-step loop's."""
    model = BNNet()
    module = _sam_lightning_module(model)
    trainer = _lightning_fit(module, loader=_lightning_data(), max_steps=2)
    ref, losses = _bn_reference(2, _halves())
    assert model.forwards == 4 and module.second_passes == 2
    assert module.outputs == pytest.approx(losses, rel=1e-6)
    metrics = trainer.progress_bar_metrics
    assert float(metrics["train_loss_step"]) == pytest.approx(losses[-1], rel=1e-6)
    assert float(metrics["train_loss_epoch"]) == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(sum(losses) / 2)
    assert module.mean_loss._update_count == 2
    assert float(module.mean_loss.compute()) == pytest.approx(sum(losses) / 2, rel=1e-6)
    _same_buffers(model, ref)
    _close(model, ref)


def test_lightning_automatic_bn_opt_out() -> None:
    model = BNNet()
    _lightning_fit(_sam_lightning_module(model, freeze_bn_stats=False), loader=_lightning_data())
    ref, _ = _bn_reference(3, _halves(), freeze=False)
    assert int(model.body[1].num_batches_tracked) == 6
    _same_buffers(model, ref)
    _close(model, ref)


def test_lightning_automatic_plain_module_raises() -> None:
    """A plain LightningModule in automatic mode would log L(w + e): refused, weights kept."""
    import lightning.pytorch as pl

    model = Net()

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return nnf.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return _sam(self.net)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="SAMLightningModule"):
        _lightning_fit(Plain(), loader=_lightning_data())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_lightning_manual_without_first_step_raises() -> None:
    """Manual mode: ``opt.step()`` with no first_step gets Lightning's no-op closure, which
    would perturb and step on nothing; it raises and says what to call."""
    import lightning.pytorch as pl

    model = Net()

    class Forgot(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = nnf.cross_entropy(self.net(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            return loss

        def configure_optimizers(self):
            return _sam(self.net)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="manual optimization"):
        _lightning_fit(Forgot(), loader=_lightning_data())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_lightning_value_clipping_clips_only_the_second_pass() -> None:
    """``gradient_clip_algorithm="value"`` changes the ascent direction if it clips g1: only
    g2 is clipped, as in the two-step loop with clipping before second_step."""
    model = BNNet()
    _lightning_fit(
        _sam_lightning_module(model),
        loader=_lightning_data(),
        gradient_clip_val=0.02,
        gradient_clip_algorithm="value",
    )
    ref, _ = _bn_reference(3, _halves(), clip_value=0.02)
    _close(model, ref)


class _HFBNNet(BNNet):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        return Net.forward(self, x, labels)


@pytest.mark.parametrize("freeze", [True, False])
def test_hf_sam_trainer_keeps_bn_stats_of_the_first_pass(tmp_path, freeze: bool) -> None:
    model = _HFBNNet()
    opt = _sam(model, **({} if freeze else {"freeze_bn_stats": False}))
    _sam_trainer(tmp_path, model, opt).train()
    ref, _ = _bn_reference(3, [_data()], freeze=freeze)
    assert model.forwards == 6
    _same_buffers(model, ref)
    _close(model, ref)


def _hf_ddp_worker(rank: int, out: str) -> None:
    """SAMTrainer on 2 gloo ranks, 2 micro-batches of 4 per step: records what each rank saw
    and its final weights."""
    from helpers import free_port

    # What a launcher sets; the process group itself is spawn_gloo's, already initialised.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    import torch.distributed as dist
    from transformers import TrainingArguments

    from fused_sam.integrations.transformers import SAMTrainer

    class Recording(Net):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def forward(self, x, labels=None):
            self.seen.append((x.detach().clone(), labels.clone()))
            return super().forward(x, labels)

    model = Recording()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    args = TrainingArguments(
        output_dir=os.path.join(out, str(rank)),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        ddp_backend="gloo",
    )
    SAMTrainer(model=model, args=args, train_dataset=_HFData(), optimizers=(opt, None)).train()
    seen: list = [None, None]
    dist.all_gather_object(seen, model.seen)
    weights: list = [None, None]
    dist.all_gather_object(weights, [p.detach() for p in model.parameters()])
    if rank == 0:
        torch.save({"seen": seen, "weights": weights}, os.path.join(out, "result.pt"))


@pytest.mark.distributed
def test_hf_sam_trainer_ddp_accumulation_perturbs_per_device(tmp_path) -> None:
    """Under DDP with gradient_accumulation_steps=2 the first pass of every micro-batch is
    replica-local (the README's m-sharpness), the last one's included."""
    from helpers import spawn_gloo

    spawn_gloo(_hf_ddp_worker, str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    seen, weights = result["seen"], result["weights"]
    for a, b in zip(*weights):
        assert torch.equal(a, b)  # the replicas agree
    ref = Net()
    params = list(ref.parameters())
    for step in range(2):
        total = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            for mb in range(2):  # forwards per step: (pass 1, pass 2) per micro-batch
                xs, ys = seen[rank][step * 4 + mb * 2]
                g1 = torch.autograd.grad(nnf.cross_entropy(ref(xs), ys) / 2, params)
                norm = torch.cat([g.reshape(-1) for g in g1]).norm()
                with torch.no_grad():
                    for p, g in zip(params, g1):
                        p.add_(0.05 * g / (norm + 1e-12))
                g2 = torch.autograd.grad(nnf.cross_entropy(ref(xs), ys) / 2, params)
                with torch.no_grad():
                    for p, g in zip(params, g1):
                        p.sub_(0.05 * g / (norm + 1e-12))
                    for t, g in zip(total, g2):
                        t.add_(g / 2)  # DDP averages over the 2 ranks
        with torch.no_grad():
            for p, t in zip(params, total):
                p.sub_(0.1 * t)
    for p, q in zip(params, weights[0]):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=1e-5)


def test_accelerate_accumulate_raises_before_perturbing() -> None:
    """accelerator.accumulate with gradient_accumulation_steps=2: the wrapper's step() is a
    no-op on the window's first micro-batch, so first_step there raises, weights at w."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Net()
    prepared, opt, loader = accelerator.prepare(model, _sam(model), _lightning_data())
    sam = unwrap_sam(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=1"):
        for xb, yb in loader:
            with accelerator.accumulate(prepared):
                accelerator.backward(nnf.cross_entropy(prepared(xb), yb))
                sam.first_step(zero_grad=True)
                accelerator.backward(nnf.cross_entropy(prepared(xb), yb))
                opt.step()
                opt.zero_grad()
    assert not sam.in_flight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_accelerate_accumulation_recipe_is_the_full_batch_step() -> None:
    """The README's Accelerate accumulation recipe: 2 micro-batches of 8 per SAM step give the
    two-step loop's full-batch step on 16."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = Net()
    prepared, opt, loader = accelerator.prepare(model, _sam(model), _lightning_data())
    sam = unwrap_sam(opt)
    k = 2
    for _ in range(3):
        window = list(loader)
        for i, (xb, yb) in enumerate(window):
            with accelerator.no_sync(prepared) if i < k - 1 else contextlib.nullcontext():
                accelerator.backward(nnf.cross_entropy(prepared(xb), yb) / k)
        sam.first_step(zero_grad=True)
        for i, (xb, yb) in enumerate(window):
            with accelerator.no_sync(prepared) if i < k - 1 else contextlib.nullcontext():
                accelerator.backward(nnf.cross_entropy(prepared(xb), yb) / k)
        opt.step()
        opt.zero_grad()
    _close(model, _reference_run(3, [_data()]))


def test_unwrap_sam_says_what_to_pass(tmp_path) -> None:
    from transformers import Trainer

    trainer = Trainer(model=Net(), args=_hf_args(tmp_path), train_dataset=_HFData())
    with pytest.raises(TypeError, match=r"creates it in train.*Pass the FusedSAM you built"):
        unwrap_sam(trainer)

    class Lookahead:  # timm's keeps the optimizer it wraps in _base_optimizer
        def __init__(self, base) -> None:
            self._base_optimizer = base

        def step(self) -> None: ...

    sgd = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"Lookahead -> \._base_optimizer: SGD.*FusedSAM\("):
        unwrap_sam(Lookahead(sgd))
    sam = _sam(Net())
    assert unwrap_sam(Lookahead(sam)) is sam
