"""Parameter sets of ``fused-sam bench``: shapes synthesised from known architectures, custom
sizes, or a user model given as ``module:factory``; and the parameters built from them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["PARAM_SETS", "Shape", "make_params", "param_shapes"]

Shape = tuple[int, ...]


def _resnet_shapes(blocks: Sequence[int], bottleneck: bool, classes: int = 1000) -> list[Shape]:
    """Parameter shapes of torchvision's ResNet in ``named_parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    expansion = 4 if bottleneck else 1
    for stage, n_blocks in enumerate(blocks):
        width = 64 * 2**stage
        out_ch = width * expansion
        for b in range(n_blocks):
            if bottleneck:
                convs = [(width, in_ch, 1, 1), (width, width, 3, 3), (out_ch, width, 1, 1)]
            else:
                convs = [(width, in_ch, 3, 3), (width, width, 3, 3)]
            for conv in convs:
                shapes += [conv, (conv[0],), (conv[0],)]  # conv weight, BN weight, BN bias
            if b == 0 and (stage > 0 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # downsample
            in_ch = out_ch
    return [*shapes, (classes, in_ch), (classes,)]


def _vit_shapes(
    depth: int = 12, dim: int = 768, mlp: int = 3072, patch: int = 16, tokens: int = 197
) -> list[Shape]:
    """Parameter shapes of ViT-B/16 (timm / torchvision layout)."""
    shapes: list[Shape] = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return [*shapes, (dim,), (dim,), (1000, dim), (1000,)]


#: Named parameter sets: name -> (description, shapes factory).
PARAM_SETS: dict[str, tuple[str, Callable[[], list[Shape]]]] = {
    "resnet18": (
        "ResNet-18 (11.7M params, 62 tensors)",
        lambda: _resnet_shapes([2, 2, 2, 2], False),
    ),
    "resnet50": (
        "ResNet-50 (25.6M params, 161 tensors)",
        lambda: _resnet_shapes([3, 4, 6, 3], True),
    ),
    "vit_b": ("ViT-B/16 (86.6M params, 152 tensors)", _vit_shapes),
    "small1000": ("1000 tensors of 1000 params (1M params)", lambda: [(1000,)] * 1000),
    "tiny": ("8 tensors, 38k params (tests)", lambda: [(64, 32, 3, 3), (64,), (64,), (10, 64)] * 2),
}


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"a model is given as module:factory (e.g. torchvision.models:resnet18), got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --model {spec}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (--model {spec})")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def param_shapes(
    preset: str | None = None, sizes: Sequence[int] | None = None, model: str | None = None
) -> tuple[str, list[Shape]]:
    """Resolve exactly one of ``preset`` / ``sizes`` / ``model`` to ``(description, shapes)``.

    Args:
        preset: a key of :data:`PARAM_SETS`.
        sizes: custom tensor sizes (numels), one 1-D tensor each.
        model: ``module:factory``; the factory is called with no arguments and must return an
            ``nn.Module`` whose trainable parameter shapes are used.
    """
    given = [x is not None for x in (preset, sizes, model)]
    if sum(given) != 1:
        raise ValueError("give exactly one of a parameter set, --sizes or --model")
    if preset is not None:
        if preset not in PARAM_SETS:
            raise ValueError(
                f"unknown parameter set {preset!r}; choose from {', '.join(PARAM_SETS)}"
            )
        desc, make = PARAM_SETS[preset]
        return desc, make()
    if sizes is not None:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"--sizes must be positive integers, got {list(sizes)}")
        return f"custom ({len(sizes)} tensors)", [(int(s),) for s in sizes]
    assert model is not None
    shapes = [tuple(p.shape) for p in _load_factory(model).parameters() if p.requires_grad]
    if not shapes:
        raise ValueError(f"{model}() has no trainable parameters")
    return model, shapes


def make_params(shapes: Sequence[Shape], device: torch.device | str, seed: int = 0) -> list[Tensor]:
    """Leaf fp32 parameters of the given shapes with random gradients filled in."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params
