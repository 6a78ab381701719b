"""Small models and independent SAM implementations used by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


def kept(numel: int, sparsity: float) -> int:
    """Entries a sparse-SAM mask keeps, floor(N (1 - s)), written independently of the code
    under test: the sparsity in millionths, so 0.3 is exactly 3/10."""
    return numel * (1_000_000 - round(sparsity * 1_000_000)) // 1_000_000


def state_tensors(opt: torch.optim.Optimizer, params) -> list[torch.Tensor]:
    """Every tensor of the optimizer state of ``params``, in a fixed order."""
    out = []
    for p in params:
        for key in sorted(opt.state[p]):
            v = opt.state[p][key]
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def flat_state(obj) -> list[torch.Tensor]:
    """Every tensor and number of a (nested) state dict, in a fixed order (None and strings
    are left out)."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in flat_state(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_state(v)]
    if isinstance(obj, (bool, int, float)):
        return [torch.tensor(float(obj), dtype=torch.float64)]
    return []


def odd_params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Parameters with odd sizes, a 0-dim one, a non-dense view and a channels_last tensor."""
    ps = [torch.randn(s, dtype=dtype) for s in [(1,), (3,), (4097,), (), (33, 7)]]
    ps.append(torch.randn(16, 10, dtype=dtype)[:, ::2])  # not dense: its grad will be contiguous
    ps.append(torch.randn(2, 3, 5, 4, dtype=dtype).to(memory_format=torch.channels_last))
    ps.append(torch.randn(5, 7, dtype=dtype).t())
    return [nn.Parameter(p) for p in ps]


def odd_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A smooth loss whose gradient depends on the weights (so pass 2 differs from pass 1)."""
    total = torch.zeros((), dtype=params[0].dtype)
    for i, p in enumerate(params):
        c = 0.5 + 0.1 * ((i + step) % 5)
        total = total + (c * p * p + torch.sin(p + 0.3 * step)).sum()
    return total


def backward(params: list[torch.Tensor], step: int, skip: set[int] | None = None) -> None:
    """Fill ``.grad`` of every parameter except the indices in ``skip`` (their grad stays None)."""
    used = [p for i, p in enumerate(params) if not skip or i not in skip]
    odd_loss(used, step).backward()


class LoopSAM:
    """The community per-tensor SAM algorithm (davda54/sam), written out in a few lines.

    e_w = rho * (w^2 if adaptive else 1) * g / (||(|w| if adaptive else 1) * g|| + 1e-12)
    """

    def __init__(self, params, base_cls, rho=0.05, adaptive=False, **kwargs):
        self.params = list(params)
        self.base = base_cls(self.params, **kwargs)
        self.rho, self.adaptive, self.old = rho, adaptive, {}

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.norm(
            torch.stack(
                [((p.abs() if self.adaptive else 1.0) * p.grad).norm(p=2) for p in with_grad]
            ),
            p=2,
        )
        scale = self.rho / (norm + 1e-12)
        for p in with_grad:
            self.old[p] = p.clone()
            p.add_((torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}
        self.base.step()
        for p in self.params:
            p.grad = None


class OfficialASAM:
    """Official ASAM (SamsungLabs): T_w = |w| + eta on parameters whose name contains 'weight'."""

    def __init__(self, named_params, base_cls, rho=0.5, eta=0.01, **kwargs):
        self.named = list(named_params)
        self.base = base_cls([p for _, p in self.named], **kwargs)
        self.rho, self.eta, self.old = rho, eta, {}

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        norms, ts = [], {}
        for n, p in self.named:
            if p.grad is None:
                continue
            t = p.abs() + self.eta if "weight" in n else torch.ones_like(p)
            ts[p] = t
            norms.append((t * p.grad).norm(p=2))
        norm = torch.norm(torch.stack(norms), p=2) + 1e-16
        for p, t in ts.items():
            self.old[p] = p.clone()
            p.add_(self.rho * t * t * p.grad / norm)
            p.grad = None

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}
        self.base.step()
        for _, p in self.named:
            p.grad = None


def small_net(bn_momentum: float | None = 0.1) -> nn.Module:
    """A tiny MLP with BatchNorm, for end-to-end behaviour tests."""
    return nn.Sequential(
        nn.Linear(10, 32),
        nn.BatchNorm1d(32, momentum=bn_momentum),
        nn.ReLU(),
        nn.Linear(32, 3),
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, fn, port: int, world: int, args: tuple) -> None:
    import os
    import sys
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    code = 0
    try:
        fn(rank, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # A gloo worker that returns normally aborts at interpreter exit about half the time
    # ("terminate called without an active exception"): leave without the interpreter's exit.
    os._exit(code)


def spawn_gloo(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes joined by a gloo process group on
    127.0.0.1; raises if any of them fails. ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_entry, args=(fn, free_port(), world, args), nprocs=world, join=True)
