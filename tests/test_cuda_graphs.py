"""A whole SAM training step captured in a CUDA graph and replayed (``gpu`` tests).

Capture needs a step with nothing read on the host: the Triton or the native CUDA backend (their
kernels read ``lr`` and ``rho`` from one-element device tensors and decide a skip on the device)
and the fused SGD/Adam/AdamW update. An LR scheduler then changes the ``lr`` tensor in place
between replays. The replays must give the weights and optimizer state of the same steps run
eagerly.

The CPU checks at the end run everywhere: without a GPU nothing can be captured, but the
refusals that protect a capture can be checked by pretending one is in progress.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from conftest import require_backend
from torch import nn

from fused_sam import FusedSAM
from fused_sam import functional as F

STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).cuda()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 32, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())
        for _ in range(STEPS + 3)
    ]


def _sam(model: nn.Module, base: str, tensors: bool, backend: str = "triton") -> FusedSAM:
    def hyper(value: float):
        # float64, so the kernels read exactly the value the eager run gets as a float.
        return torch.tensor(value, dtype=torch.float64, device="cuda") if tensors else value

    if base == "sgd":
        return FusedSAM(
            model.parameters(), torch.optim.SGD, rho=hyper(0.05), lr=hyper(0.1), momentum=0.9,
            nesterov=True, weight_decay=1e-3, backend=backend,
        )  # fmt: skip
    adamw = torch.optim.AdamW(model.parameters(), lr=hyper(1e-2), capturable=True)
    return FusedSAM(adamw, rho=hyper(0.05), backend=backend)


def _step(model: nn.Module, opt: FusedSAM, x: torch.Tensor, y: torch.Tensor) -> None:
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _schedule(opt: FusedSAM) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)


def _eager_run(base: str, tensors: bool, data, backend: str) -> tuple[nn.Module, FusedSAM]:
    model = _model()
    opt = _sam(model, base, tensors=tensors, backend=backend)
    sched = _schedule(opt)
    for x, y in data:
        _step(model, opt, x, y)
        sched.step()
    return model, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gpu_graph_replay_equals_eager_with_a_scheduler(base: str, backend: str) -> None:
    """Three eager warm-up steps, then one captured step replayed; lr decays every step.

    A replay runs the kernels of the eager step on the same inputs, so the weights and the
    optimizer state must be the same bits as those of the same configuration run eagerly
    (a tolerance would hide a replay that reads a stale lr, table or step counter for one
    step). The configuration with float hyperparameters is another program (AdamW's step
    counters on the host, not capturable), compared at a tolerance."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    require_backend(backend, "cuda")
    data = _batches()
    ref_model, ref = _eager_run(base, tensors=True, data=data, backend=backend)

    model = _model()
    opt = _sam(model, base, tensors=True, backend=backend)
    sched = _schedule(opt)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, backups, tables, compiled kernels
        for x, y in data[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            _step(model, opt, static_x, static_y)
            sched.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(model, opt, static_x, static_y)
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched.step()  # fills the lr tensor in place: the next replay reads the new value
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert torch.equal(_bits(a.detach()), _bits(b.detach())), f"parameter {i}"
    for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                w = ref.state[q][key]
                assert torch.equal(_bits(v), _bits(w.to(v.device))), f"parameter {i} {key}"
    float_model, _ = _eager_run(base, tensors=False, data=data, backend=backend)
    for a, b in zip(model.parameters(), float_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_capture_refuses_what_would_freeze() -> None:
    """A backend that reads lr on the host (foreach) refuses to be captured, with a message
    that says how to capture, instead of recording a frozen lr."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    data = _batches()
    for backend in ("foreach",):
        model = _model()
        lr = torch.tensor(0.1, dtype=torch.float64, device="cuda")
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=lr, momentum=0.9, backend=backend)
        x, y = data[0]
        _step(model, opt, x, y)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="triton"), torch.cuda.graph(graph):
            _step(model, opt, x, y)
        assert not opt.in_flight


def test_building_graph_is_false_eagerly() -> None:
    """Eagerly (no torch.compile, no capture) the optimizer reads hyperparameters normally."""
    assert not F.building_graph()


def test_capture_without_a_fused_step_raises_clearly(monkeypatch) -> None:
    """Pretending a capture is in progress: a backend without a fused restore+step refuses
    (the base optimizer's own step would read lr on the host), and the weights are restored."""
    import fused_sam.functional as functional_module

    model = nn.Linear(4, 3)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="foreach")
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    model(x).square().sum().backward()
    opt.first_step(zero_grad=True)
    model(x).square().sum().backward()
    monkeypatch.setattr(functional_module, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        opt.second_step()
    assert not opt.in_flight
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_capture_refuses_backends_that_read_the_host(monkeypatch) -> None:
    """Pretending a capture is in progress: first_step refuses a backend that is not
    capturable (the CPU kernels take lr and rho as numbers) before touching anything."""
    import fused_sam.functional as functional_module

    model = nn.Linear(4, 3)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).square().sum().backward()
    monkeypatch.setattr(functional_module, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        opt.first_step()
    assert not opt.in_flight
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_replay_benchmark_script_refuses_without_a_gpu() -> None:
    """The staged benchmark (benchmarks/cuda_graphs.py) imports and says what it needs."""
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu session runs the script itself")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "cuda_graphs.py")],
        capture_output=True, text=True, timeout=120, cwd=root,
    )  # fmt: skip
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


def test_a_cached_pointer_table_reused_by_a_capture_is_kept(monkeypatch) -> None:
    """A Triton pointer table made before a capture and reused during it is read by every
    replay: it must be kept like the tables made during the capture, or its eviction from the
    cache would free memory the graph reads. (Pretending a capture: a cache hit uploads
    nothing, so no GPU is needed.)"""
    _table = pytest.importorskip("fused_sam.backends.triton._table")
    device = torch.device("cuda")
    xs = [torch.empty(10), torch.empty(3)]
    key = (device, 8, (10, 3), (tuple(t.data_ptr() for t in xs),))
    made_before = _table.Table(torch.zeros(8, dtype=torch.int64), 2, 3, False)
    monkeypatch.setitem(_table._CACHE, key, made_before)
    monkeypatch.setattr(_table, "_CAPTURED", [])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _table.pointer_table([xs], [10, 3], 8, device) is made_before
    assert _table._CAPTURED == []  # no capture: nothing is pinned
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for _ in range(2):
        assert _table.pointer_table([xs], [10, 3], 8, device) is made_before
    assert len(_table._CAPTURED) == 1 and _table._CAPTURED[0] is made_before
