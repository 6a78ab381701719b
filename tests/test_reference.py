"""The oracle's base-optimizer steps agree with torch.optim's own SGD, Adam and AdamW."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from fused_sam import reference as R
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks import pack_bits, packed_numel, unpack_bits

STEPS = 7


def _params(dtype=torch.float64):
    return [torch.randn(s, dtype=dtype) for s in [(5,), (3, 4), ()]]


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
def test_reference_sgd_matches_torch(momentum, nesterov, weight_decay, maximize) -> None:
    dampening = 0.0 if nesterov else 0.1
    ours = _params()
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = torch.optim.SGD(
        theirs,
        lr=0.1,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        foreach=False,
    )
    bufs = [torch.zeros_like(p) for p in ours]
    for step in range(STEPS):
        grads = [torch.randn_like(p) for p in ours]
        R.restore_sgd_step_(
            ours,
            grads,
            ours,
            bufs if momentum else [],
            SGDHyper(
                lr=0.1,
                weight_decay=weight_decay,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                maximize=maximize,
            ),
            first_step=step == 0,
            grad_scale=None,
            found_inf=None,
        )
        for p, g in zip(theirs, grads):
            p.grad = g
        opt.step()
    for a, b in zip(ours, theirs):
        assert_close(a, b.detach())


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_reference_adam_matches_torch(cls, amsgrad, maximize) -> None:
    ours = _params()
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = cls(
        theirs,
        lr=1e-2,
        betas=(0.8, 0.99),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=False,
    )
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    vmax = [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros(()) for _ in ours]
    for _ in range(STEPS):
        grads = [torch.randn_like(p) for p in ours]
        R.restore_adam_step_(
            ours,
            grads,
            ours,
            m,
            v,
            vmax if amsgrad else [],
            steps,
            AdamHyper(
                lr=1e-2,
                beta1=0.8,
                beta2=0.99,
                eps=1e-8,
                weight_decay=1e-2,
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled_weight_decay=cls is torch.optim.AdamW,
            ),
            grad_scale=None,
            found_inf=None,
        )
        for p, g in zip(theirs, grads):
            p.grad = g
        opt.step()
    for a, b in zip(ours, theirs):
        assert_close(a, b.detach())
    for q, mm, vv in zip(theirs, m, v):
        assert_close(mm, opt.state[q]["exp_avg"])
        assert_close(vv, opt.state[q]["exp_avg_sq"])


def test_reference_perturb_is_the_published_rule() -> None:
    ws = _params()
    gs = [torch.randn_like(w) for w in ws]
    sumsq = R.norm_sq_partials(gs, ws, adaptive=True, eta=0.01)
    moved = [w.clone() for w in ws]
    R.perturb_(moved, gs, [torch.empty_like(w) for w in ws], sumsq, 0.5, 1e-12, True, 0.01, None)
    t = [w.abs() + 0.01 for w in ws]
    norm = torch.cat([(ti * g).reshape(-1) for ti, g in zip(t, gs)]).norm()
    for w, m, ti, g in zip(ws, moved, t, gs):
        assert_close(m, w + 0.5 * ti * ti * g / norm)


def test_mask_bits_round_trip_in_memory_order() -> None:
    for shape, fmt in [((13,), None), ((2, 3, 4, 5), torch.channels_last), ((), None)]:
        like = torch.empty(shape)
        if fmt is not None:
            like = like.to(memory_format=fmt)
        mask = torch.rand(shape) < 0.5
        mask_l = torch.empty_like(like, dtype=torch.bool).copy_(mask)
        packed = pack_bits(mask_l)
        assert packed.numel() == packed_numel(like.numel())
        assert torch.equal(unpack_bits(packed, like), mask)
    # element k of memory order is bit k % 8 of byte k // 8
    assert pack_bits(torch.tensor([True, False, True] + [False] * 6)).tolist() == [5, 0]
