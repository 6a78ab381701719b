"""A short FusedSAM run on CUDA for compute-sanitizer (memcheck, racecheck).

Every CUDA-capable backend, SGD and AdamW bases, odd sizes and a mask: each kernel family runs
a few times on small tensors, so the sanitizer's slowdown stays bearable.
"""

from __future__ import annotations

import torch
from torch import nn

from fused_sam import FusedSAM, functional


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    backends = [b for b, why in functional.available_backends(device).items() if why is None]
    for backend in backends:
        for base in (torch.optim.SGD, torch.optim.AdamW):
            params = [
                nn.Parameter(torch.randn(s, device=device))
                for s in [(1,), (3,), (4097,), (33, 7), ()]
            ]
            kw = {"lr": 0.1, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01}
            opt = FusedSAM(params, base, rho=0.05, backend=backend, sparsity=0.5,
                           mask="dynamic", mask_update_every=2, **kw)  # fmt: skip
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.first_step(zero_grad=True)
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.second_step(zero_grad=True)
            torch.cuda.synchronize()
            print(backend, base.__name__, "ok", flush=True)


if __name__ == "__main__":
    main()
