"""RandomMask (ESAM's stochastic weight perturbation), drawn inside the perturbation kernels.

The oracle here is written independently of :mod:`fused_sam.masks`: the hash in Python integers
(murmur3's 32-bit finaliser of ``key + j * 0x9E3779B9``), the element positions from each
tensor's strides, and ESAM's rule ``e = (m / keep) * rho * g / ||g||`` with SGD in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CPU_BACKENDS, require_backend
from helpers import odd_params, spawn_gloo
from torch import Tensor, nn

from fused_sam import FusedSAM, RandomMask
from fused_sam import functional as F
from fused_sam.masks import RandomBits, element_hash, random_mask, tensor_salt

M32 = 2**32 - 1


def fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) % 2**32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) % 2**32
    return x ^ (x >> 16)


def expected_hash(key: int, j: int) -> int:
    return fmix32((key + (j % 2**32) * 0x9E3779B9) % 2**32)


def memory_positions(p: Tensor) -> Tensor:
    """Each element's position in the order its storage holds it (dims by decreasing stride)."""
    order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
    walk = torch.arange(p.numel()).reshape([p.shape[d] for d in order])
    inverse = [order.index(d) for d in range(p.dim())]
    return walk.permute(inverse).reshape(p.shape)


def expected_mask(key: int, keep: float, p: Tensor) -> Tensor:
    threshold = min(max(round(keep * 2**32), 1), M32)
    pos = memory_positions(p).reshape(-1).tolist()
    bits = [expected_hash(key, j) < threshold for j in pos]
    return torch.tensor(bits, dtype=torch.bool).reshape(p.shape)


def test_element_hash_matches_python_integers() -> None:
    """The tensor hash (int64 ops, no overflow) equals the 32-bit one, past 2^32 positions too."""
    j = torch.tensor([0, 1, 2, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3])
    for key in (0, 1, 0xDEADBEEF, M32):
        got = element_hash(key, j).tolist()
        assert got == [expected_hash(key, int(x)) for x in j]


def test_random_mask_follows_memory_order() -> None:
    """A channels_last or transposed parameter's bits follow its storage, as the kernels walk it."""
    bits = RandomMask(keep=0.5, seed=3).bits([tensor_salt(i) for i in range(3)])
    assert bits is not None
    shapes = [
        torch.empty(2, 3, 5, 4).to(memory_format=torch.channels_last),
        torch.empty(7, 5).t(),
        torch.empty(33),
    ]
    for i, p in enumerate(shapes):
        assert torch.equal(random_mask(bits, i, p), expected_mask(bits.key(i), 0.5, p))


def test_density_and_independence() -> None:
    """Each entry kept with probability keep; steps, tensors and seeds draw independent masks."""
    n = 1 << 20
    like = torch.empty(n)
    for keep in (0.1, 0.5, 0.9):
        rm = RandomMask(keep=keep, seed=0)
        first = rm.bits([tensor_salt(0), tensor_salt(1)])
        rm.draws += 1
        second = rm.bits([tensor_salt(0), tensor_salt(1)])
        a = random_mask(first, 0, like)
        b = random_mask(first, 1, like)
        c = random_mask(second, 0, like)
        other_seed = RandomMask(keep=keep, seed=1).bits([tensor_salt(0)])
        d = random_mask(other_seed, 0, like)
        sigma = (keep * (1 - keep) / n) ** 0.5
        assert abs(a.float().mean().item() - keep) < 5 * sigma
        # Two independent masks overlap on keep^2 of the entries.
        sigma2 = (keep**2 * (1 - keep**2) / n) ** 0.5
        for x in (b, c, d):
            assert abs((a & x).float().mean().item() - keep**2) < 5 * sigma2


def test_same_seed_same_masks_and_validation() -> None:
    """Masks are a function of (seed, draws, position); bad options are refused."""
    a, b = RandomMask(0.5, seed=9), RandomMask(0.5, seed=9)
    a.draws = b.draws = 4
    assert a.bits([1, 2]) == b.bits([1, 2])
    assert RandomMask(1.0).bits([1]) is None  # keep=1: plain SAM, no mask at all
    for keep in (0, -0.1, 1.5, True, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="keep"):
            RandomMask(keep)
    for seed in (-1, 2**64, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            RandomMask(0.5, seed=seed)
    m = nn.Linear(3, 2)
    for bad in (dict(sparsity=0.5), dict(mask_update_every=2), dict(mask_norm="masked")):
        with pytest.raises(ValueError, match="RandomMask"):
            FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, mask=RandomMask(0.5), **bad)


def _grads(ps: list[Tensor], step: int, k: int) -> list[Tensor]:
    out = []
    for i, p in enumerate(ps):
        w = p.detach().double()
        out.append(((1 + 0.1 * i) * w + torch.cos(w + 0.3 * step + 0.1 * k)).to(p.dtype))
    return out


def esam_sgd(params: list[Tensor], keep: float, seed: int, rho: float, steps: int, **sgd):
    """ESAM's stochastic weight perturbation with SGD (momentum, nesterov, weight decay), float64.

    The masks come from this module's own hash: tensor ``i`` at draw ``t`` uses the key
    ``salt_i ^ step_key(seed, t)``, where salts and step keys are FusedSAM's documented values.
    """
    ws = [p.detach().double().clone() for p in params]
    bufs: list[Tensor | None] = [None] * len(ws)
    lr, mu, wd = sgd["lr"], sgd["momentum"], sgd["weight_decay"]
    for step in range(steps):
        rm = RandomMask(keep, seed)
        rm.draws = step
        key = rm.step_key()
        g1 = _grads([w.to(params[0].dtype) for w in ws], step, 0)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
        perturbed = []
        for i, (w, g) in enumerate(zip(ws, g1)):
            m = expected_mask(tensor_salt(i) ^ key, keep, params[i]).double()
            perturbed.append(w + m / keep * rho * g.double() / (norm + 1e-12))
        g2 = _grads([w.to(params[0].dtype) for w in perturbed], step, 1)
        for i, (w, g) in enumerate(zip(ws, g2)):
            d = g.double() + wd * w
            bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
            w -= lr * (d + mu * bufs[i]) if sgd["nesterov"] else lr * bufs[i]
    return ws, bufs


SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)


def _train(opt: FusedSAM, ps: list[Tensor], steps: range) -> None:
    for step in steps:
        for p, g in zip(ps, _grads(ps, step, 0)):
            p.grad = g
        opt.first_step(zero_grad=True)
        for p, g in zip(ps, _grads(ps, step, 1)):
            p.grad = g
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_sam_matches_esam(backend: str, dtype: torch.dtype) -> None:
    """Weights and momentum over 4 steps, every layout of odd_params (0-dim, channels_last,
    non-dense, transposed), against ESAM written here."""
    require_backend(backend)
    torch.manual_seed(0)
    ps = odd_params(dtype)
    want_w, want_buf = esam_sgd(ps, keep=0.3, seed=123, rho=0.5, steps=4, **SGD)
    opt = FusedSAM(
        ps, torch.optim.SGD, rho=0.5, mask=RandomMask(0.3, seed=123), backend=backend, **SGD
    )
    _train(opt, ps, range(4))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for i, p in enumerate(ps):
        torch.testing.assert_close(p.detach().double(), want_w[i], **tol, msg=f"param {i}")
        buf = opt.state[p]["momentum_buffer"].double()
        torch.testing.assert_close(buf, want_buf[i], **tol, msg=f"momentum {i}")
    assert opt.state_dict()["sam_random_mask"] == {"keep": 0.3, "seed": 123, "draws": 4}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_keep_one_is_plain_sam(backend: str) -> None:
    """keep=1 perturbs every entry by SAM's e: the same weights bit for bit as no mask."""
    require_backend(backend)
    runs = []
    for mask in (RandomMask(1.0), "fisher"):
        torch.manual_seed(0)
        ps = odd_params()
        opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, mask=mask, backend=backend, **SGD)
        _train(opt, ps, range(2))
        runs.append(ps)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _twin(p: Tensor) -> nn.Parameter:
    """A copy with the same strides (a non-dense view stays non-dense, so it takes the same
    backend)."""
    t = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype)
    return nn.Parameter(t.copy_(p.detach()))


def test_resume_is_bit_identical_and_rejects_foreign_checkpoints() -> None:
    """A checkpoint carries the draw count: the resumed run draws the same masks."""
    torch.manual_seed(0)
    ps = odd_params()
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, mask=RandomMask(0.5, seed=4), **SGD)
    _train(opt, ps, range(3))
    ckpt = copy.deepcopy(opt.state_dict())
    saved = [_twin(p) for p in ps]
    _train(opt, ps, range(3, 6))

    resumed = [_twin(w) for w in saved]
    opt2 = FusedSAM(resumed, torch.optim.SGD, rho=0.5, mask=RandomMask(0.5, seed=77), **SGD)
    opt2.load_state_dict(ckpt)
    assert (opt2._policies.random.seed, opt2._policies.random.draws) == (4, 3)
    _train(opt2, resumed, range(3, 6))
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)

    plain = FusedSAM([_twin(w) for w in saved], torch.optim.SGD, rho=0.5, **SGD)
    with pytest.raises(ValueError, match="RandomMask"):
        plain.load_state_dict(ckpt)
    # A bare base optimizer's checkpoint restarts the draws (and keeps the seed).
    opt2.load_state_dict(opt2.base_optimizer.state_dict())
    assert (opt2._policies.random.seed, opt2._policies.random.draws) == (4, 0)


def test_masks_do_not_depend_on_which_params_have_grads() -> None:
    """A parameter's mask comes from its position among all parameters: a parameter without a
    gradient this step does not shift the others' masks."""
    torch.manual_seed(0)
    ws = [torch.randn(64) for _ in range(3)]
    runs = []
    for with_first in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, lr=0.1, mask=RandomMask(0.5, seed=1))
        for i, p in enumerate(ps):
            if with_first or i > 0:
                p.grad = torch.ones_like(p)
        opt.first_step()
        runs.append([p.detach() != w for p, w in zip(ps, ws)])  # the entries that moved
        opt.restore()
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    assert 0 < int(runs[0][1].sum()) < 64


def test_native_op_checks_random_mask_arguments() -> None:
    """The op refuses salts of the wrong length, salts together with bit masks, and thresholds
    outside [1, 2^32), before writing anything."""
    require_backend("cpu")
    ops = torch.ops.fused_sam
    w = [torch.randn(10), torch.randn(3)]
    g = [torch.randn(10), torch.randn(3)]
    b = [torch.zeros(10), torch.zeros(3)]
    s = torch.ones(1)
    bits = [torch.zeros(2, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)]
    before = [t.clone() for t in w]
    bad = [
        dict(masks=[], salts=[1], step_key=0, threshold=5),
        dict(masks=bits, salts=[1, 2], step_key=0, threshold=5),
        dict(masks=[], salts=[1, 2], step_key=0, threshold=0),
        dict(masks=[], salts=[1, 2], step_key=0, threshold=2**32),
        dict(masks=[], salts=[1, 2], step_key=-1, threshold=5),
        dict(masks=[], salts=[1, 2**32], step_key=0, threshold=5),
    ]
    for kw in bad:
        with pytest.raises(RuntimeError, match="fused_sam"):
            ops.perturb_(w, g, b, s, 0.1, 1e-12, False, 0.0, **kw)
        assert all(torch.equal(x, y) for x, y in zip(w, before))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_random_bits_buckets(backend: str) -> None:
    """Per-tensor SAM values split a call into buckets; each bucket keeps its tensors' keys."""
    require_backend(backend)
    torch.manual_seed(0)
    ps = [torch.randn(n) for n in (5, 300, 17, 4096)]
    gs = [torch.randn_like(p) for p in ps]
    rho = [0.5, 0.2, 0.5, 0.2]
    bits = RandomMask(0.5, seed=2).bits([tensor_salt(i) for i in range(4)])
    assert isinstance(bits, RandomBits)
    out = {}
    for name in ("reference", backend):
        w = [p.clone() for p in ps]
        sumsq = F.norm_sq(gs, w, [False] * 4, [0.0] * 4, "reference")
        F.perturb_(w, gs, [torch.empty_like(p) for p in ps], sumsq, rho, 1e-12, [False] * 4,
                   [0.0] * 4, bits, name)  # fmt: skip
        out[name] = w
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gs))
    for i, (p, g) in enumerate(zip(ps, gs)):
        m = expected_mask(bits.key(i), 0.5, p).double()
        want = p.double() + m * 2.0 * rho[i] * g.double() / (norm + 1e-12)
        torch.testing.assert_close(out[backend][i].double(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out["reference"][i].double(), want, atol=1e-6, rtol=1e-5)


def _ddp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, mask=RandomMask(0.5, 3))
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save(gathered, out)


def test_ddp_ranks_draw_identical_masks(tmp_path) -> None:
    """Two gloo ranks: the same seed gives every rank the same masks (identical weights), and
    the run equals one process on the concatenated batch."""
    out = str(tmp_path / "weights.pt")
    spawn_gloo(_ddp_worker, out)
    r0, r1 = torch.load(out)
    assert torch.equal(r0, r1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, mask=RandomMask(0.5, 3))
    for step in range(3):
        batches = []
        for rank in range(2):
            g = torch.Generator().manual_seed(100 * step + rank)
            batches.append((torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)))
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        nn.functional.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(r0, single, atol=1e-6, rtol=1e-5)
