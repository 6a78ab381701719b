"""The empirical Fisher diagonal that SSAM-F scores with: per-sample gradients, squared and
summed over ``n`` single examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

#: A loss of (outputs, targets), e.g. ``nn.functional.cross_entropy``.
LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Per-sample gradients and the empirical Fisher diagonal


def _take(data: Iterable[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    have = 0
    for x, y in data:
        xs.append(x[: n - have])
        ys.append(y[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    if have == 0:
        raise ValueError("the data to score the Fisher diagonal on yielded no examples")
    return torch.cat(xs), torch.cat(ys)


class _EvalMode:
    """Put a module in eval mode and restore every submodule's own training flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def fisher_diagonal(
    params: Sequence[Tensor],
    *,
    model: nn.Module | None = None,
    data: Iterable[tuple[Tensor, Tensor]] | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    loss: Callable[[], Tensor] | None = None,
    num_samples: int = 16,
    chunk_size: int = 16,
    per_sample: str = "auto",
) -> list[Tensor]:
    r"""Empirical Fisher diagonal :math:`\sum_i g_i^2` of single-example gradients.

    See :class:`FisherMask` for the arguments. Parameters the loss does not reach (or that
    ``model`` does not own) score 0. Accumulates in float32 (float64 for float64 parameters).
    The sum over examples runs in example order within a chunk and chunk after chunk, so the
    ``vmap`` and ``loop`` paths agree to rounding, not bit for bit.
    """
    acc = [
        torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
        for p in params
    ]
    with torch.enable_grad():
        if loss is not None:
            _fisher_from_losses(params, loss, acc)
            return acc
        if model is None or data is None:
            raise ValueError("fisher_diagonal needs model and data, or loss")
        device = params[0].device if params else torch.device("cpu")
        xs, ys = _take(data, num_samples)
        xs, ys = xs.to(device), ys.to(device)
        with _EvalMode(model):
            if per_sample != "loop":
                try:
                    _fisher_vmap(params, model, xs, ys, loss_fn, chunk_size, acc)
                    return acc
                except (RuntimeError, NotImplementedError):
                    if per_sample == "vmap":
                        raise
                    for a in acc:
                        a.zero_()
            _fisher_loop(params, model, xs, ys, loss_fn, acc)
    return acc


def _fisher_vmap(params, model, xs, ys, loss_fn, chunk_size, acc) -> None:
    from torch.func import functional_call, grad, vmap

    index = {id(p): i for i, p in enumerate(params)}
    names = [(n, index[id(p)]) for n, p in model.named_parameters() if id(p) in index]
    frozen = {n: p.detach() for n, p in model.named_parameters() if id(p) not in index}
    frozen.update(dict(model.named_buffers()))

    def one(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **weights}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(one), in_dims=(None, 0, 0))
    weights = {n: params[i].detach() for n, i in names}
    for start in range(0, xs.shape[0], chunk_size):
        g = per_sample_grad(weights, xs[start : start + chunk_size], ys[start : start + chunk_size])
        for n, i in names:
            acc[i].add_(g[n].to(acc[i].dtype).square().sum(0))


def _fisher_loop(params, model, xs, ys, loss_fn, acc) -> None:
    owned = {id(p) for p in model.parameters()}
    live = [i for i, p in enumerate(params) if p.requires_grad and id(p) in owned]
    for j in range(xs.shape[0]):
        value = loss_fn(model(xs[j : j + 1]), ys[j : j + 1])
        _accumulate(value, params, live, acc, retain=False)


def _fisher_from_losses(params, loss: Callable[[], Tensor], acc) -> None:
    losses = loss()
    if losses.dim() != 1:
        raise ValueError(f"loss() must return a 1-D tensor of per-example losses: {losses.shape}")
    live = [i for i, p in enumerate(params) if p.requires_grad]
    for j in range(losses.shape[0]):
        _accumulate(losses[j], params, live, acc, retain=j + 1 < losses.shape[0])


def _accumulate(value: Tensor, params, live: list[int], acc, retain: bool) -> None:
    grads = torch.autograd.grad(
        value, [params[i] for i in live], retain_graph=retain, allow_unused=True
    )
    for i, g in zip(live, grads):
        if g is not None:
            acc[i].add_(g.to(acc[i].dtype).square())
