"""Sparse SAM through FusedSAM: the published algorithms, backends, resume, plain-SAM identity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from helpers import LoopSAM, kept
from test_masks import loop_fisher, oracle_topk, small_cnn
from torch import nn

from fused_sam import DynamicMask, FisherMask, FusedSAM
from fused_sam.masks import packed_numel, unpack_bits

RHO = 0.05
EPS = 1e-12


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: intra-op threads cost far more than they save (100x on a
    # loaded 2-core machine), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat_mask(opt: FusedSAM, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([unpack_bits(opt.masks[p], p).reshape(-1) for p in params])


def split_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m.view(p.shape) for m, p in zip(flat.split([p.numel() for p in params]), params)]


class Batches:
    """Train batches, the same sequence for the optimizer under test and the oracle."""

    def __init__(self, steps: int, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(7)
        self.items = [
            (
                torch.randn(8, 3, 6, 6, generator=g, dtype=dtype),
                torch.randint(0, 5, (8,), generator=g),
            )
            for _ in range(steps)
        ]


class Reshuffled:
    """Scoring data that yields other examples at every iteration (like a shuffled loader)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(40, 3, 6, 6, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 5, (40,), generator=g)
        self.calls = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.calls)
        self.calls += 1
        perm = torch.randperm(self.x.shape[0], generator=g)
        for i in range(0, self.x.shape[0], 10):
            yield self.x[perm[i : i + 10]], self.y[perm[i : i + 10]]


def oracle_sam_step(model, base, x, y, choose_mask) -> torch.Tensor:
    """SSAM step as published: e = rho g / ||g|| (unmasked norm) * m; exact restore; base step.

    ``choose_mask(g)`` returns the flat mask of this step; it runs after the first pass (so
    after that forward has updated any BatchNorm running statistics) and may use ``g``.
    """
    params = list(model.parameters())
    base.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in params]
    mask_flat = choose_mask(g)
    norm = torch.cat([t.reshape(-1) for t in g]).norm()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi, m in zip(params, g, split_like(mask_flat, params)):
            p.add_(RHO * gi / (norm + EPS) * m)
    base.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    base.step()
    return mask_flat


def run_fused(opt, model, batches) -> list[torch.Tensor]:
    """Train with FusedSAM; the flat mask used at each step."""
    params = list(model.parameters())
    used = []
    for x, y in batches.items:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        used.append(flat_mask(opt, params))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return used


# ---------------------------------------------------------------------------------------------
# The published algorithms, independently implemented


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_ssam_f_matches_the_published_algorithm(per_sample: str) -> None:
    steps, every, sparsity = 8, 3, 0.5
    batches = Batches(steps)
    model = small_cnn(dropout=0.0)  # two runs must see the same function
    twin = copy.deepcopy(model)
    policy = FisherMask(Reshuffled(), model, num_samples=16, per_sample=per_sample, chunk_size=5)
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=0.1,
        momentum=0.9,
        sparsity=sparsity,
        mask=policy,
        mask_update_every=every,
        backend="foreach",
    )
    used = run_fused(opt, model, batches)

    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scoring = Reshuffled()
    n = sum(p.numel() for p in twin.parameters())
    k = kept(n, sparsity)
    mask = None

    def choose(t: int, g: list[torch.Tensor]) -> torch.Tensor:
        nonlocal mask
        if t % every == 0:  # refreshes at steps 0, 3, 6, scored at the current weights
            fisher = torch.cat([f.reshape(-1) for f in loop_fisher(twin, list(scoring), 16)])
            keep = oracle_topk(fisher.tolist(), k)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(keep)] = True
        return mask

    for t, (x, y) in enumerate(batches.items):
        want = oracle_sam_step(twin, base, x, y, lambda g, t=t: choose(t, g))
        assert torch.equal(used[t], want), f"mask differs at step {t}"
        assert int(used[t].sum()) == k
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert len({tuple(u.nonzero().flatten().tolist()) for u in used}) == 3  # it did move


@pytest.mark.parametrize(
    ("drop", "grow"), [("gradient", "random"), ("weight", "gradient"), ("random", "random")]
)
def test_ssam_d_matches_the_published_algorithm(drop: str, grow: str) -> None:
    steps, every, sparsity, total, rate = 9, 2, 0.6, 9, 0.5
    batches = Batches(steps)
    model = small_cnn(dropout=0.0)  # two runs must see the same function
    twin = copy.deepcopy(model)
    policy = DynamicMask(rate, total_steps=total, drop=drop, grow=grow, seed=1234)
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=0.1,
        sparsity=sparsity,
        mask=policy,
        mask_update_every=every,
        backend="foreach",
    )
    used = run_fused(opt, model, batches)

    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    params = list(twin.parameters())
    n = sum(p.numel() for p in params)
    k = kept(n, sparsity)
    gen = torch.Generator().manual_seed(1234)
    rand = lambda: torch.rand(n, dtype=torch.float64, generator=gen)  # noqa: E731
    mask = None

    def choose(t: int, g: list[torch.Tensor]) -> torch.Tensor:
        nonlocal mask
        if mask is None:  # random initial mask at the target density
            keep = oracle_topk(rand().tolist(), k)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(keep)] = True
        elif t % every == 0:
            # The refresh at step t scores with the first-pass gradient of step t.
            score = {
                "gradient": lambda: torch.cat([gi.abs().reshape(-1) for gi in g]),
                "weight": lambda: torch.cat([p.detach().abs().reshape(-1) for p in params]),
                "random": rand,
            }
            drop_score, grow_score = score[drop]().tolist(), score[grow]().tolist()
            dr = rate * (1 + math.cos(math.pi * t / total)) / 2
            d = min(int(k * dr), n - k)
            live = mask.nonzero().flatten().tolist()
            dead = (~mask).nonzero().flatten().tolist()
            stay = oracle_topk([drop_score[i] for i in live], k - d)
            born = oracle_topk([grow_score[i] for i in dead], d)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[[live[j] for j in stay]] = True
            mask[[dead[j] for j in born]] = True
        return mask

    for t, (x, y) in enumerate(batches.items):
        want = oracle_sam_step(twin, base, x, y, lambda g, t=t: choose(t, g))
        assert torch.equal(used[t], want), f"mask differs at step {t}"
        assert int(used[t].sum()) == k
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Density, memory, norm options


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 3))


def step_once(opt: FusedSAM, model: nn.Module, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.5, 0.95])
@pytest.mark.parametrize("mask", ["dynamic", "fisher"])
def test_density_is_exact_and_masks_are_bit_packed(sparsity: float, mask: str) -> None:
    model = mlp()
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    policy = FisherMask([(x, y)], model) if mask == "fisher" else DynamicMask(seed=0)
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        sparsity=sparsity,
        mask=policy,
        mask_update_every=2,
    )
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    for _ in range(5):
        step_once(opt, model, x, y)
        assert int(flat_mask(opt, params).sum()) == kept(n, sparsity)
    assert opt.mask_policy is policy
    assert all(m.dtype == torch.uint8 and m.dim() == 1 for m in opt.masks.values())
    nbytes = sum(m.numel() * m.element_size() for m in opt.masks.values())
    assert nbytes == sum(packed_numel(p.numel()) for p in params)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_sparsity_zero_is_plain_sam_bit_for_bit(backend: str) -> None:
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    runs = []
    for kwargs in ({}, dict(sparsity=0.0, mask="dynamic", mask_update_every=1)):
        model = mlp()
        opt = FusedSAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kwargs
        )
        for _ in range(7):
            step_once(opt, model, x, y)
        assert opt.masks == {} and "sparse_sam" not in opt.state_dict()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # ...and that is SAM: the community per-tensor algorithm, written out in the helpers.
    model = mlp()
    loop = LoopSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(7):
        nn.functional.cross_entropy(model(x), y).backward()
        loop.first_step()
        nn.functional.cross_entropy(model(x), y).backward()
        loop.second_step()
    for a, b in zip(runs[0], model.parameters()):
        assert_close(a, b.detach(), "params")


@pytest.mark.parametrize("mask_norm", ["full", "masked"])
def test_perturbation_is_masked_and_normalised_as_documented(mask_norm: str) -> None:
    model = mlp()
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        lr=0.1,
        sparsity=0.7,
        mask=DynamicMask(seed=0),
        mask_norm=mask_norm,
    )
    params = list(model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in params]).double()
    w = torch.cat([p.detach().reshape(-1) for p in params]).double()
    opt.first_step()
    m = flat_mask(opt, params)
    e = torch.cat([p.detach().reshape(-1) for p in params]).double() - w
    assert torch.all(e[~m] == 0)
    norm = g.norm() if mask_norm == "full" else (g * m).norm()
    torch.testing.assert_close(e, 0.1 * g * m / norm, atol=1e-7, rtol=1e-5)
    if mask_norm == "masked":
        assert e.norm().item() == pytest.approx(0.1, rel=1e-5)
    else:
        assert e.norm().item() < 0.1
    opt.restore()


# ---------------------------------------------------------------------------------------------
# Backends with a mask on: params AND optimizer state over 7 steps against the reference


def _backend_run(backend: str, base: str, mask_norm: str):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 4097 // 33))
    x, y = torch.randn(16, 13), torch.randint(0, 4097 // 33, (16,))
    cls, kw = (
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4))
        if base == "sgd"
        else (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))
    )
    # Random drop and grow: the masks depend on the policy's generator only, so backends that
    # differ by rounding still see the same masks.
    opt = FusedSAM(
        model.parameters(),
        cls,
        backend=backend,
        sparsity=0.5,
        mask=DynamicMask(total_steps=7, drop="random", grow="random", seed=5),
        mask_update_every=3,
        mask_norm=mask_norm,
        **kw,
    )
    for _ in range(7):
        step_once(opt, model, x, y)
    params = list(model.parameters())
    return params, opt, flat_mask(opt, params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("mask_norm", ["full", "masked"])
def test_backends_agree_with_reference_with_masks(backend: str, base: str, mask_norm: str) -> None:
    require_backend(backend)
    want_p, want_opt, want_m = _backend_run("reference", base, mask_norm)
    got_p, got_opt, got_m = _backend_run(backend, base, mask_norm)
    assert torch.equal(got_m, want_m)
    for a, b in zip(got_p, want_p):
        assert_close(a.detach(), b.detach(), "params")
    for pa, pb in zip(got_p, want_p):
        sa, sb = got_opt.state[pa], want_opt.state[pb]
        assert sorted(sa) == sorted(sb)
        for key in sb:
            assert_close(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]), key)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("mask", ["dynamic", "fisher"])
def test_resume_is_bit_identical(mask: str) -> None:
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))

    def build(model):
        policy = (
            FisherMask([(x, y)], model, num_samples=8)
            if mask == "fisher"
            else DynamicMask(total_steps=12, grow="random", seed=11)
        )
        return FusedSAM(
            model.parameters(),
            torch.optim.SGD,
            lr=0.1,
            momentum=0.9,
            sparsity=0.5,
            mask=policy,
            mask_update_every=3,
        )

    model = mlp()
    opt = build(model)
    for _ in range(4):
        step_once(opt, model, x, y)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert set(ckpt["opt"]) == {"state", "param_groups", "sparse_sam"}
    for _ in range(6):
        step_once(opt, model, x, y)

    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt2 = FusedSAM(
        resumed.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        sparsity=0.5,
        mask=DynamicMask(total_steps=12, seed=999)  # another seed: the checkpoint wins
        if mask == "dynamic"
        else FisherMask([(x, y)], resumed, num_samples=8),
        mask_update_every=3,
    )
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(6):
        step_once(opt2, resumed, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    ps, ps2 = list(model.parameters()), list(resumed.parameters())
    assert torch.equal(flat_mask(opt, ps), flat_mask(opt2, ps2))

    # The checkpoint minus the masks is a plain SGD checkpoint: SGD loads its momentum.
    bare = torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9)
    bare.load_state_dict({k: v for k, v in ckpt["opt"].items() if k != "sparse_sam"})
    loaded = [bare.state[p]["momentum_buffer"] for p in bare.param_groups[0]["params"]]
    saved = [ckpt["opt"]["state"][i]["momentum_buffer"] for i in range(len(loaded))]
    assert len(loaded) == 4 and all(torch.equal(a, b) for a, b in zip(loaded, saved))


def test_checkpoint_with_masks_needs_a_sparse_optimizer() -> None:
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask="dynamic")
    step_once(opt, model, torch.randn(4, 13), torch.randint(0, 3, (4,)))
    dense = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="sparsity=0"):
        dense.load_state_dict(opt.state_dict())
    # A checkpoint without masks (plain SAM or bare SGD) starts the masks afresh.
    opt.load_state_dict(dense.state_dict())
    assert opt.masks == {} and opt.state_dict()["sparse_sam"]["steps"] == 0
    step_once(opt, model, torch.randn(4, 13), torch.randint(0, 3, (4,)))
    assert len(opt.masks) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# Schedules and the manual refresh


def test_manual_refresh_every_epoch() -> None:
    model = mlp()
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask="fisher")
    with pytest.raises(RuntimeError, match="update_mask"):
        step_once(opt, model, x, y)  # no examples to score on yet
    opt.restore()
    opt.zero_grad()
    params = list(model.parameters())
    masks = []
    for _epoch in range(3):
        opt.update_mask([(x, y)], model=model)
        masks.append(flat_mask(opt, params))
        for _ in range(2):
            step_once(opt, model, x, y)
        assert torch.equal(flat_mask(opt, params), masks[-1])  # no automatic refresh
    want = oracle_topk(
        torch.cat([f.reshape(-1) for f in loop_fisher(model, [(x, y)], 16)]).tolist(),
        kept(sum(p.numel() for p in params), 0.5),
    )
    opt.update_mask([(x, y)], model=model)
    assert set(flat_mask(opt, params).nonzero().flatten().tolist()) == want


def test_manual_refresh_is_not_repeated_by_the_schedule() -> None:
    model = mlp()
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    calls = []

    class Counting(DynamicMask):
        def select(self, request):
            calls.append(request.step)
            return super().select(request)

    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        sparsity=0.5,
        mask=Counting(seed=0),
        mask_update_every=2,
    )
    for _ in range(5):
        step_once(opt, model, x, y)
    assert calls == [2, 4]  # step 0 made the initial mask
    nn.functional.cross_entropy(model(x), y).backward()
    opt.update_mask()  # at step 5, by hand
    opt.zero_grad()
    step_once(opt, model, x, y)  # step 5: no second refresh
    step_once(opt, model, x, y)  # step 6: due
    assert calls == [2, 4, 5, 6]


def test_argument_validation() -> None:
    ps = list(mlp().parameters())
    bad = [
        dict(sparsity=-0.1),
        dict(sparsity=1.0),
        dict(sparsity="half"),
        dict(sparsity=0.5, mask="magnitude"),
        dict(sparsity=0.5, mask_update_every=0),
        dict(sparsity=0.5, mask="dynamic", mask_update_every=True),
        dict(sparsity=0.5, mask_norm="l1"),
        dict(sparsity=0.5, mask="fisher", mask_update_every=5),  # nothing to score on
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            FusedSAM(ps, torch.optim.SGD, lr=0.1, **kwargs)
    with pytest.raises(RuntimeError, match="sparsity > 0"):
        FusedSAM(ps, torch.optim.SGD, lr=0.1).update_mask()


def test_update_mask_with_a_per_example_loss_callable() -> None:
    """update_mask(loss=fn): SSAM-F scores with the per-example losses fn returns."""
    model = mlp()
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask="fisher")

    def losses() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    opt.update_mask(loss=losses)
    params = list(model.parameters())
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(16):  # the empirical Fisher diagonal, one example at a time
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params
        )
        for f, g in zip(fisher, grads):
            f += g.detach() ** 2
    want = oracle_topk(
        torch.cat([f.reshape(-1) for f in fisher]).tolist(),
        kept(sum(p.numel() for p in params), 0.5),
    )
    assert set(flat_mask(opt, params).nonzero().flatten().tolist()) == want
    step_once(opt, model, x, y)


def test_custom_mask_policy() -> None:
    """A MaskPolicy subclass: its select() decides the mask the perturbation reads."""
    from fused_sam import MaskPolicy

    class LargestWeights(MaskPolicy):
        def select(self, request):
            flat = torch.cat([p.detach().abs().reshape(-1) for p in request.params])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.argsort(descending=True, stable=True)[: request.num_keep]] = True
            return list(keep.split([p.numel() for p in request.params]))

    model = mlp()
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.75,
                   mask=LargestWeights(), mask_update_every=1)  # fmt: skip
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    moved = torch.cat([(p.detach() != b).reshape(-1) for p, b in zip(params, before)])
    flat_w = torch.cat([b.abs().reshape(-1) for b in before])
    k = kept(flat_w.numel(), 0.75)
    want = set(oracle_topk(flat_w.tolist(), k))
    assert set(flat_mask(opt, params).nonzero().flatten().tolist()) == want
    assert set(moved.nonzero().flatten().tolist()) <= want  # only masked entries move
    opt.restore()


def test_mask_does_not_depend_on_the_layout() -> None:
    """The same weights as contiguous and as channels_last tensors: the same SSAM-F mask,
    element by element (scores, top-k and bit packing all follow the logical index)."""
    torch.manual_seed(3)
    w = torch.randn(4, 3, 2, 2)
    x, y = torch.randn(6, 3, 5, 5), torch.randint(0, 4, (6, 4, 4))
    masks = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv = nn.Conv2d(3, 4, 2, bias=False)
        conv.weight.data = w.clone().to(memory_format=fmt)
        policy = FisherMask([(x, y)], conv, num_samples=6)
        opt = FusedSAM(
            conv.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask=policy,
            mask_update_every=1,
        )  # fmt: skip
        nn.functional.cross_entropy(conv(x), y).backward()
        opt.first_step(zero_grad=True)
        assert conv.weight.is_contiguous(memory_format=fmt)
        masks.append(unpack_bits(opt.masks[conv.weight], conv.weight).contiguous())
        opt.restore()
    assert torch.equal(masks[0], masks[1]) and 0 < int(masks[0].sum()) < masks[0].numel()


def test_parameter_added_after_a_refresh_makes_a_refresh_due_at_the_next_step() -> None:
    """Decision: a parameter group added after the last refresh (layers unfrozen while
    fine-tuning) makes the next first_step refresh the mask over every parameter, as the first
    mask is made, instead of leaving it unperturbed until update_mask() with no word. A policy
    that cannot score on its own says so there, and update_mask() then covers it."""
    model = mlp()
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5,
                   mask=DynamicMask(seed=0))  # fmt: skip
    opt.update_mask()
    extra = nn.Parameter(torch.randn(70))
    opt.add_param_group({"params": [extra]})
    before = extra.detach().clone()
    (nn.functional.cross_entropy(model(x), y) + (extra**2).sum()).backward()
    opt.first_step(zero_grad=True)
    assert extra in opt.masks
    assert not torch.equal(extra, before)  # perturbed where its new mask keeps it
    kept_bits = unpack_bits(opt.masks[extra], extra)
    assert torch.equal(extra != before, kept_bits)
    opt.restore()

    fisher = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5)
    fisher.update_mask([(x, y)], model=model)
    late = nn.Parameter(torch.randn(5))
    fisher.add_param_group({"params": [late]})
    w = [p.detach().clone() for p in [*model.parameters(), late]]
    (nn.functional.cross_entropy(model(x), y) + (late**2).sum()).backward()
    with pytest.raises(RuntimeError, match="update_mask"):
        fisher.first_step()
    for p, b in zip([*model.parameters(), late], w):
        assert torch.equal(p, b)
    fisher.update_mask([(x, y)], model=model)  # the refresh covers it
    assert late in fisher.masks
