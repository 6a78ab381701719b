"""Mask selection and scoring: exact density, deterministic global top-k, Fisher, drop/grow."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import kept
from torch import nn

from fused_sam import DynamicMask, FisherMask, MaskRequest
from fused_sam.masks import (
    fisher_diagonal,
    global_topk,
    num_kept,
    pack_mask,
    packed_numel,
    topk_mask,
    unpack_bits,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: intra-op threads cost far more than they save (100x on a
    # loaded 2-core machine), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def oracle_topk(flat: list[float], k: int) -> set[int]:
    """Independent top-k: sort by (score descending, index ascending), NaN last."""

    def key(i: int) -> tuple[float, int]:
        s = flat[i]
        return (math.inf if math.isnan(s) else -s, i)

    return set(sorted(range(len(flat)), key=key)[:k])


# ---------------------------------------------------------------------------------------------
# Density and top-k


@pytest.mark.parametrize(
    ("n", "s", "k"),
    [(10, 0.3, 7), (10, 0.0, 10), (10, 0.99, 0), (7, 0.5, 3), (1000, 0.2, 800), (3, 0.1, 2)],
)
def test_num_kept_is_exact(n: int, s: float, k: int) -> None:
    assert num_kept(n, s) == k


def test_num_kept_no_float_off_by_one() -> None:
    # Binary floats would give floor(10 * 0.7000000000000001) etc.; decimal arithmetic must not.
    for n in range(1, 300):
        for tenths in range(10):
            s = tenths / 10
            assert num_kept(n, s) == (n * (10 - tenths)) // 10


@pytest.mark.parametrize("k", [0, 1, 5, 17, 39, 40])
def test_topk_mask_ties_go_to_lower_index(k: int) -> None:
    # Integer scores in a small range: many ties at every threshold.
    scores = torch.randint(0, 4, (40,)).float()
    scores[[3, 11]] = float("nan")
    got = topk_mask(scores, k)
    assert got.sum().item() == k
    assert set(got.nonzero().flatten().tolist()) == oracle_topk(scores.tolist(), k)


def test_topk_mask_infinities() -> None:
    scores = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), float("inf"), 0.0])
    assert topk_mask(scores, 3).tolist() == [True, True, False, False, True, False]
    assert topk_mask(scores, 5).tolist() == [True, True, True, False, True, True]


def test_global_topk_is_one_topk_over_all_params() -> None:
    # One tensor dominates: a per-tensor top-k would keep entries of every tensor.
    scores = [torch.rand(3, 4), torch.rand(5) + 10, torch.rand(2, 2, 2), torch.zeros(())]
    scores[2][0, 1, 1] = 10.5  # ties with nothing; must beat most of tensor 1
    masks = global_topk(scores, 6)
    flat = torch.cat([s.reshape(-1) for s in scores]).tolist()
    want = oracle_topk(flat, 6)
    got = torch.cat([m.reshape(-1) for m in masks]).nonzero().flatten().tolist()
    assert set(got) == want
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert masks[1].all() and masks[2].sum() == 1 and not masks[0].any()


def test_global_topk_tie_rule_is_the_flat_global_index() -> None:
    scores = [torch.ones(3), torch.ones(2, 2), torch.ones(1)]
    masks = global_topk(scores, 4)
    assert masks[0].all() and masks[1].reshape(-1).tolist() == [True, False, False, False]
    assert not masks[2].any()


def test_pack_mask_follows_the_parameter_layout() -> None:
    for p in (
        torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last),
        torch.randn(5, 7).t(),
        torch.randn(16, 10)[:, ::2],
        torch.randn(13),
        torch.randn(()),
    ):
        logical = torch.rand(p.shape) < 0.5
        packed = pack_mask(logical, p)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(p.numel())
        assert torch.equal(unpack_bits(packed, p), logical)


# ---------------------------------------------------------------------------------------------
# SSAM-D policy


def test_death_rate_is_cosine_decayed() -> None:
    pol = DynamicMask(drop_rate=0.5, total_steps=100, seed=0)
    assert pol.death_rate(0) == 0.5
    assert pol.death_rate(50) == pytest.approx(0.25)
    assert pol.death_rate(100) == pytest.approx(0.0, abs=1e-15)
    assert pol.death_rate(150) == pol.death_rate(100)  # clamped past the end of the run
    assert DynamicMask(drop_rate=0.3, seed=0).death_rate(10**6) == 0.3


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_dynamic_refresh_keeps_density_and_moves_exactly_d(sparsity: float) -> None:
    params = [torch.randn(7, 3), torch.randn(11), torch.randn(2, 2, 5)]
    grads = [torch.randn_like(p) for p in params]
    n = sum(p.numel() for p in params)
    k = kept(n, sparsity)
    pol = DynamicMask(drop_rate=0.5, total_steps=10, seed=3)
    first = pol.initial(MaskRequest(params, grads, None, k, 0))
    assert sum(int(m.sum()) for m in first) == k
    second = pol.select(MaskRequest(params, grads, first, k, 2))
    assert sum(int(m.sum()) for m in second) == k
    old = torch.cat([m.reshape(-1) for m in first])
    new = torch.cat([m.reshape(-1) for m in second])
    death = 0.5 * (1 + math.cos(math.pi * 2 / 10)) / 2  # dr(t) at t = 2 of T = 10
    d = min(math.floor(k * death), n - k)
    assert int((old & ~new).sum()) == d and int((new & ~old).sum()) == d
    # The survivors are the live entries with the largest |g|.
    g = torch.cat([x.abs().reshape(-1) for x in grads])
    live = old.nonzero().flatten().tolist()
    keep = oracle_topk([g[i].item() for i in live], k - d)
    assert {live[j] for j in keep} == set((old & new).nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------------
# SSAM-F scoring


def small_cnn(dtype: torch.dtype = torch.float64, dropout: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * 6 * 6, 5),
    ).to(dtype)


def image_data(n: int = 24, batch: int = 10, dtype: torch.dtype = torch.float64):
    x = torch.randn(n, 3, 6, 6, dtype=dtype)
    y = torch.randint(0, 5, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loop_fisher(model: nn.Module, data, n: int) -> list[torch.Tensor]:
    """Independent Fisher: one backward per example, eval mode, as the definition reads."""
    xs = torch.cat([x for x, _ in data])[:n]
    ys = torch.cat([y for _, y in data])[:n]
    was = model.training
    model.eval()
    out = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(n):
        model.zero_grad()
        nn.functional.cross_entropy(model(xs[i : i + 1]), ys[i : i + 1]).backward()
        for acc, p in zip(out, model.parameters()):
            acc += p.grad**2
    model.zero_grad()
    model.train(was)
    return out


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_fisher_matches_per_example_backward(per_sample: str) -> None:
    model, data = small_cnn(), image_data()
    want = loop_fisher(model, data, 16)
    got = fisher_diagonal(
        list(model.parameters()), model=model, data=data, num_samples=16, per_sample=per_sample
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fisher_has_no_side_effects() -> None:
    model, data = small_cnn(), image_data()
    model.train()
    model[1].eval()  # a submodule's own flag must come back as it was
    bn = {k: v.clone() for k, v in model[1].named_buffers()}
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    fisher_diagonal(list(model.parameters()), model=model, data=data, num_samples=8)
    assert model.training and not model[1].training and model[5].training
    for k, v in model[1].named_buffers():
        assert torch.equal(v, bn[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_fisher_falls_back_to_a_loop_when_vmap_cannot_run() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            return out if out.sum().item() > -1e9 else -out  # .item(): not vmap-able

    model = DataDependent()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    params = list(model.parameters())
    with pytest.raises(RuntimeError):
        fisher_diagonal(params, model=model, data=data, num_samples=6, per_sample="vmap")
    got = fisher_diagonal(params, model=model, data=data, num_samples=6)
    want = loop_fisher(model, data, 6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fisher_from_a_per_example_loss_callable() -> None:
    model, data = small_cnn(), image_data()
    xs, ys = data[0]

    def losses() -> torch.Tensor:
        model.eval()
        try:
            return nn.functional.cross_entropy(model(xs), ys, reduction="none")
        finally:
            model.train()

    got = FisherMask(loss=losses).scores(list(model.parameters()))
    want = loop_fisher(model, data, xs.shape[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fisher_scores_params_the_model_does_not_reach_as_zero() -> None:
    model, data = small_cnn(), image_data()
    stray = nn.Parameter(torch.randn(3, dtype=torch.float64))
    got = fisher_diagonal([*model.parameters(), stray], model=model, data=data, num_samples=4)
    assert torch.equal(got[-1], torch.zeros(3, dtype=torch.float64))


def test_policy_validation() -> None:
    for bad in (
        dict(num_samples=0),
        dict(num_samples=2.5),
        dict(chunk_size=0),
        dict(per_sample="batched"),
    ):
        with pytest.raises(ValueError):
            FisherMask(**bad)
    for bad in (
        dict(drop_rate=1.5),
        dict(drop_rate=-0.1),
        dict(total_steps=0),
        dict(drop="magnitude"),
        dict(grow="best"),
    ):
        with pytest.raises(ValueError):
            DynamicMask(**bad)
    with pytest.raises(RuntimeError, match="examples to score"):
        FisherMask().scores([torch.zeros(2, requires_grad=True)])
