"""The parts of a SAM step (fused_sam/step/), each called without the optimizer.

The optimizer tests drive these parts through ``FusedSAM``; here each part is checked on its own
contract: what it returns for explicit arguments, what it caches, and what it refuses.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_sam.masks import RandomMask
from fused_sam.step import amp, base_steps, plan, validation
from fused_sam.step.policies import SCHEDULE_KEY, Policies
from fused_sam.step.state import StepState
from fused_sam.variants import EveryK, FriendlySAM

BACKENDS = ("reference", "foreach", "cpu")


def _params(*shapes: tuple[int, ...]) -> list[nn.Parameter]:
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _no_policies() -> Policies:
    return Policies.build(
        schedule=None,
        direction=None,
        sparsity=0.0,
        mask="fisher",
        mask_update_every=None,
        mask_norm="full",
    )


# --- plan -------------------------------------------------------------------------------------


def test_first_pass_flattens_group_values_per_tensor() -> None:
    a, b, c = _params((3, 4), (5,), (2, 2))
    c.grad = None  # no gradient: not part of the step
    groups = [
        {"params": [a, b], "rho": 0.1, "adaptive": "weights", "eta": 0.01, "maximize": False},
        {"params": [c], "rho": 0.2, "adaptive": True, "eta": 0.0, "maximize": True},
    ]
    fp = plan.first_pass(groups, False, lambda group, rho: rho)
    assert [id(p) for p in fp.params] == [id(a), id(b)]
    assert fp.rho == [0.1, 0.1] and fp.adaptive == [True, False] and fp.eta == [0.01, 0.01]
    c.grad = torch.ones_like(c)
    fp = plan.first_pass(groups, False, lambda group, rho: 2 * rho)
    assert fp.rho == [0.2, 0.2, -0.4]  # maximize flips the ascent; rho_of applies per group
    assert fp.adaptive == [True, False, True]


def test_first_pass_revalidates_a_scheduled_rho() -> None:
    (a,) = _params((3,))
    groups = [{"params": [a], "rho": -1.0, "adaptive": False, "eta": 0.0}]
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
        plan.first_pass(groups, False, lambda group, rho: rho)


def test_sparse_gradients_are_refused() -> None:
    (a,) = _params((4, 3))
    a.grad = a.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        plan.dense_grads([a], False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_plan_is_reused_until_something_it_depends_on_changes(backend: str) -> None:
    ps = _params((3, 4), (7,))
    groups = [{"params": ps, "rho": 0.1, "adaptive": False, "eta": 0.0}]
    backups: dict = {}
    fp = plan.first_pass(groups, False, lambda group, rho: rho)
    first = plan.step_plan(None, fp, backups, backend, lambda params: None)
    assert [b.shape for b in first.backups] == [p.shape for p in ps]
    assert plan.step_plan(first, fp, backups, backend, lambda params: None) is first
    groups[0]["rho"] = 0.2  # a new radius: new buckets
    fp2 = plan.first_pass(groups, False, lambda group, rho: rho)
    second = plan.step_plan(first, fp2, backups, backend, lambda params: None)
    assert second is not first
    assert all(x is y for x, y in zip(second.backups, first.backups))  # backups are kept
    ps[1].data = torch.randn(9)  # a new storage and shape: a new backup
    fp3 = plan.first_pass(groups, False, lambda group, rho: rho)
    third = plan.step_plan(second, fp3, backups, backend, lambda params: None)
    assert third is not second and third.backups[1].shape == (9,)


def test_global_sumsq_is_the_identity_without_shards_or_replicas() -> None:
    sumsq = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert plan.global_sumsq(sumsq, None, replica_local=True) is sumsq  # a world of one


# --- amp --------------------------------------------------------------------------------------


def test_flags_combine_on_the_device_and_become_a_bool() -> None:
    one, zero = torch.ones(()), torch.zeros(())
    assert amp.any_flag(None, None) is None
    assert amp.any_flag(zero, None) is zero and amp.any_flag(None, one) is one
    assert float(amp.any_flag(zero, one)) == 1.0 and float(amp.any_flag(zero, zero)) == 0.0
    assert amp.skip_flag(None).dtype == torch.bool and not bool(amp.skip_flag(None))
    assert bool(amp.skip_flag(one))


def test_unscale_divides_as_the_grad_scaler_does() -> None:
    g = [torch.tensor([3.0, float("inf")]), torch.tensor([6.0], dtype=torch.float64)]
    amp.unscale(g, torch.tensor(3.0))
    assert torch.isinf(g[0][1])  # stays non-finite
    # grad * (1 / scale), the reciprocal rounded to float32, as GradScaler.unscale_
    inv = torch.tensor(1 / 3.0, dtype=torch.float32)
    assert g[0][0] == 3.0 * inv and g[1][0] == 6.0 * inv.double()


def test_second_pass_scale_factor_between_the_two_passes() -> None:
    g = [torch.tensor([8.0])]
    left, first = amp.unscale_second_pass(
        g, torch.tensor(4.0), None, torch.tensor(2.0), False, direction=None
    )
    assert left is None and g[0][0] == 2.0 and float(first) == 2.0  # 4 / 2
    with pytest.raises(RuntimeError, match=r"grad_scale=scaler\.get_scale"):
        amp.unscale_second_pass(g, None, torch.zeros(()), None, False, direction="F-SAM")
    assert amp.unscale_second_pass(g, None, torch.zeros(()), None, False, direction=None) == (
        None,
        None,
    )


def test_scaler_args_read_the_protocol_attributes() -> None:
    class Opt:
        grad_scale = torch.tensor(2.0)

    args = amp.ScalerArgs.of(Opt())
    assert args.grad_scale is Opt.grad_scale and args.scaler_inf is None


# --- base steps -------------------------------------------------------------------------------


def test_fused_entry_is_looked_up_by_base_family_and_backend() -> None:
    ps = _params((3,))
    cpu = {torch.device("cpu")}
    sgd = torch.optim.SGD(ps, lr=0.1)
    assert base_steps.fused_entry(sgd, "cpu", cpu).step is base_steps.sgd_step
    assert base_steps.fused_entry(sgd, "foreach", cpu) is None  # base.step() there
    adamw = torch.optim.AdamW(ps, lr=0.1)
    assert base_steps.fused_entry(adamw, "cpu", cpu).step is base_steps.adam_step
    assert (
        base_steps.fused_entry(
            torch.optim.Adam(ps, betas=(torch.tensor(0.9), torch.tensor(0.99))), "cpu", cpu
        )
        is None
    )
    assert base_steps.fused_entry(torch.optim.RMSprop(ps), "cpu", cpu) is None


def test_sgd_step_creates_state_in_sgds_format_and_matches_torch() -> None:
    ps = _params((4, 3), (5,))
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    torch_sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    backups = [p.detach().clone() for p in ps]
    t = base_steps.Tensors(ps, [p.grad for p in ps], backups, ps, None)
    with torch.no_grad():
        base_steps.sgd_step(base, base.param_groups[0], t, base_steps.Flags(None, None), "foreach")
    torch_sgd.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            base.state[p]["momentum_buffer"], torch_sgd.state[r]["momentum_buffer"]
        )


def test_a_skipped_first_step_creates_no_state_and_restores() -> None:
    ps = _params((3,))
    base = torch.optim.Adam(ps, lr=0.1)
    w = ps[0].detach().clone()
    backups = [w.clone()]
    ps[0].data.add_(1.0)  # "perturbed"
    t = base_steps.Tensors(ps, [ps[0].grad], backups, ps, None)
    with torch.no_grad():
        base_steps.adam_step(
            base, base.param_groups[0], t, base_steps.Flags(None, torch.ones(())), "cpu"
        )
    assert not base.state and torch.equal(ps[0].detach(), w)


def test_hooked_runs_the_base_optimizers_hooks_around_the_update() -> None:
    ps = _params((3,))
    base = torch.optim.SGD(ps, lr=0.1)
    seen: list[str] = []
    base.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    base.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    st = StepState()
    base_steps.hooked(base, lambda: seen.append("body"), st)
    assert seen == ["pre", "body"] and base._opt_called  # post-hooks once the step is done
    base_steps.post_hooks(base, st)
    base_steps.post_hooks(base, st)
    assert seen == ["pre", "body", "post"]


# --- policies ---------------------------------------------------------------------------------


def test_policies_refuse_conflicting_mask_options() -> None:
    with pytest.raises(ValueError, match="leave sparsity=0"):
        Policies.build(
            schedule=None,
            direction=None,
            sparsity=0.5,
            mask=RandomMask(0.5),
            mask_update_every=None,
            mask_norm="full",
        )
    with pytest.raises(ValueError, match="schedule must be"):
        Policies.build(
            schedule="every 5",
            direction=None,
            sparsity=0.0,
            mask="fisher",
            mask_update_every=None,
            mask_norm="full",
        )


def test_policies_own_their_shard_refusals_and_state_keys() -> None:
    pol = Policies.build(
        schedule=EveryK(3),
        direction=FriendlySAM(),
        sparsity=0.0,
        mask=RandomMask(0.5),
        mask_update_every=None,
        mask_norm="full",
    )
    with pytest.raises(ValueError, match="RandomMask"):
        pol.check_shards(object())
    pol.check_shards(None)
    assert [pol.kind(s) for s in range(4)] == ["sam", "plain", "plain", "sam"]
    ps = _params((3,))
    state = pol.state_dict(ps, steps=7)
    assert state[SCHEDULE_KEY]["steps"] == 7 and set(state) == {
        "sam_schedule",
        "sam_direction",
        "sam_random_mask",
    }
    assert not _no_policies().state_dict(ps, steps=7)
    assert _no_policies().kind(5) == "sam" and not _no_policies().gradient_hooks


# --- validation -------------------------------------------------------------------------------


def test_new_group_fills_sam_defaults_and_refuses_shared_memory() -> None:
    base = torch.zeros(10)
    a = nn.Parameter(base[0:6])
    b = nn.Parameter(base[3:9])
    defaults = {"rho": 0.05, "adaptive": False, "eta": 0.0}
    group = validation.new_group({"params": b}, defaults, [], None)
    assert group["params"] == [b] and group["rho"] == 0.05
    with pytest.raises(ValueError, match="share memory"):
        validation.new_group({"params": [b]}, defaults, [a], None)
    with pytest.raises(ValueError, match="adaptive must be"):
        validation.new_group({"params": [b], "adaptive": 2}, defaults, [], None)


def test_base_optimizer_is_built_or_taken_and_checked() -> None:
    ps = _params((3,))
    sgd = torch.optim.SGD(ps, lr=0.1)
    assert validation.base_optimizer(sgd, None, {}) is sgd
    with pytest.raises(ValueError, match="not both"):
        validation.base_optimizer(sgd, torch.optim.SGD, {})
    with pytest.raises(ValueError, match="unknown option"):
        validation.base_optimizer(ps, torch.optim.SGD, {"lr": 0.1, "betas": (0.9, 0.9)})
    assert isinstance(
        validation.base_optimizer(ps, torch.optim.Adam, {"lr": 0.1}), torch.optim.Adam
    )
