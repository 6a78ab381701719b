"""Compile the Triton kernels ahead of time for an NVIDIA target, no GPU needed.

Run as a script (``python tests/_triton_aot.py``) in an environment *without*
``TRITON_INTERPRET``: it compiles a representative set of kernel variants for sm_90 with the
compiler bundled in the triton wheel (ptxas included) and prints one JSON line per variant with
the number of 16-byte vector loads and stores found in the PTX. ``tests/test_triton.py`` runs it
in a subprocess: a kernel that does not compile, or whose aligned variant stops vectorising,
fails CI on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import warnings

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
warnings.filterwarnings("ignore")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fused_sam.backends.triton.combine import axpby_kernel, dot_kernel  # noqa: E402
from fused_sam.backends.triton.norm import norm_kernel  # noqa: E402
from fused_sam.backends.triton.perturb import perturb_kernel  # noqa: E402
from fused_sam.backends.triton.step import adam_kernel, restore_kernel, sgd_kernel  # noqa: E402

_T = "*i64"
_BASE = {"table": _T, "n_tensors": "i32", "n_chunks": "i32", "chunk": "i32"}
#: The norm partials a restore kernel checks (two of the four slots used below).
_SUMSQS = {f"s{k}": "*fp64" for k in range(4)} | {f"n{k}": "i32" for k in range(4)}
#: The 16-byte access modes of a table launch: every tensor aligned, or decided per tensor.
_MODES = (("", 1), ("/per-tensor", 2))


def _compile(fn, sig: dict[str, str], consts: dict, label: str) -> dict:
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    # Scalars the kernel annotates (float64 hyperparameters) must keep that type at run time.
    for p in fn.params:
        if p.annotation and not p.is_constexpr:
            assert p.annotation == signature[p.name], (label, p.name, p.annotation)
    # What the launcher specialises at run time: 16-byte aligned tensor arguments.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n not in consts and signature[n].startswith("*")
    }
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return {
        "kernel": label,
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
        "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[24]\.", ptx)),
        # The last-program pattern: an acquire-release atomic at GPU scope on the completion
        # counter, after a barrier; the partials read back with volatile (uncached) loads.
        "acq_rel_atomics": len(re.findall(r"atom\.global\.gpu\.acq_rel\.", ptx)),
        "volatile_loads": len(re.findall(r"ld\.volatile\.global", ptx)),
    }


def main() -> None:
    for name, dt, acc in (
        ("fp32", tl.float32, tl.float32),
        ("bf16", tl.bfloat16, tl.float32),
        ("fp16", tl.float16, tl.float32),
        ("fp64", tl.float64, tl.float64),
    ):
        for mode, aligned in _MODES:
            _family(name + mode, dt, acc, aligned)
    sig = dict(_BASE, w_arg=_T, b_arg=_T, numel_arg="i32")
    for mode, aligned in _MODES:
        consts = {"DTYPE": tl.float32, "ALIGNED": aligned, "DIRECT": False, "BLOCK": 1024}
        print(json.dumps(_compile(restore_kernel, sig, consts, f"restore/fp32{mode}")))
    # The per-tensor (torch.compile) variants take typed tensor arguments.
    sig = dict(_BASE, flag="*i1", found_inf="*fp32", grad_scale="*fp32", **_SUMSQS)
    sig.update(lr="fp64", lr_t="*fp32", weight_decay="fp64", momentum="fp64", dampening="fp64")
    sig.update(w_arg="*bf16", g_arg="*bf16", b_arg="*bf16", v_arg="*bf16", numel_arg="i32")
    consts = {"DTYPE": tl.bfloat16, "ACC": tl.float32, "HAS_INF": False, "HAS_SCALE": False}
    consts.update(NSUM=1, RBLOCK=16, LR_T=False)
    consts.update(MAXIMIZE=False, USE_WD=False, MOMENTUM=True, FIRST=True, NESTEROV=False)
    consts.update(ALIGNED=0, DIRECT=True, BLOCK=1024)
    print(json.dumps(_compile(sgd_kernel, sig, consts, "sgd/bf16/direct")))
    sig = dict(_BASE, sumsq="*fp64", n_partials="i32", rho="fp64", rho_t="*fp32", eps="fp64")
    sig.update(eta="fp64", step_key="i64", threshold="i64", w_arg="*fp32", g_arg="*fp32")
    sig.update(b_arg="*fp32", m_arg="*u8", key_arg="i64", numel_arg="i32")
    consts = {"DTYPE": tl.float32, "ACC": tl.float32, "ADAPTIVE": False, "MASK": 2, "RHO_T": True}
    consts.update(ALIGNED=0, DIRECT=True, BLOCK=1024, RBLOCK=16)
    print(json.dumps(_compile(perturb_kernel, sig, consts, "perturb/fp32/direct")))
    sig = dict(_BASE, out="*fp64", counter="*i32", n_programs="i32", a_arg="*fp32")
    sig.update(b_arg="*fp32", numel_arg="i32")
    consts = {"DTYPE": tl.float32, "ALIGNED": 0, "DIRECT": True, "BLOCK": 1024, "RBLOCK": 1024}
    print(json.dumps(_compile(dot_kernel, sig, consts, "dot/fp32/direct")))
    sig = dict(_BASE, coefs="*fp64", skip="*i64", o_arg="*bf16", x_arg="*bf16", y_arg="*bf16")
    sig.update(numel_arg="i32")
    consts = {"DTYPE": tl.bfloat16, "HAS_SKIP": False, "ALIGNED": 0, "DIRECT": True}
    consts.update(BLOCK=1024)
    print(json.dumps(_compile(axpby_kernel, sig, consts, "axpby/bf16/direct")))


def _family(name: str, dt, acc, aligned: int) -> None:
    """Every table kernel of one storage type and 16-byte access mode."""
    part = "*fp64"  # norm partials are float64 for every storage type
    common = {"DTYPE": dt, "ACC": acc, "ALIGNED": aligned, "DIRECT": False, "BLOCK": 1024}
    plain = {k: v for k, v in common.items() if k != "ACC"}
    sig = dict(_BASE, out=part, counter="*i32", n_programs="i32", eta="fp64", g_arg=_T)
    sig.update(w_arg=_T, numel_arg="i32")
    consts = dict(plain, ADAPTIVE=True, RBLOCK=1024)
    print(json.dumps(_compile(norm_kernel, sig, consts, f"norm/{name}")))
    sig = dict(_BASE, sumsq=part, n_partials="i32", rho="fp64", rho_t="*fp32", eps="fp64")
    sig.update(eta="fp64", step_key="i64", threshold="i64", w_arg=_T, g_arg=_T, b_arg=_T)
    sig.update(m_arg=_T, key_arg="i64", numel_arg="i32")
    consts = dict(common, ADAPTIVE=True, MASK=1, RHO_T=False, RBLOCK=16)
    print(json.dumps(_compile(perturb_kernel, sig, consts, f"perturb/{name}")))
    # A random mask computed in the kernel, and the radius read on the device.
    consts = dict(common, ADAPTIVE=False, MASK=2, RHO_T=True, RBLOCK=16)
    print(json.dumps(_compile(perturb_kernel, sig, consts, f"perturb/{name}/random")))
    sig = dict(_BASE, flag="*i1", found_inf="*fp32", grad_scale="*fp32", **_SUMSQS)
    sig.update(lr="fp64", lr_t="*fp32", weight_decay="fp64", momentum="fp64", dampening="fp64")
    sig.update(w_arg=_T, g_arg=_T, b_arg=_T, v_arg=_T, numel_arg="i32")
    consts = dict(common, HAS_INF=True, HAS_SCALE=True, NSUM=2, RBLOCK=16, LR_T=True)
    consts.update(MAXIMIZE=True, USE_WD=True, MOMENTUM=True, FIRST=False, NESTEROV=True)
    print(json.dumps(_compile(sgd_kernel, sig, consts, f"sgd/{name}")))
    sig = dict(_BASE, flag="*i1", counter="*i32", n_programs="i32", found_inf="*fp32")
    sig.update(grad_scale="*fp32", **_SUMSQS, lr="fp64", lr_t="*fp32", beta1="fp64")
    sig.update(beta2="fp64", eps="fp64", weight_decay="fp64", w_arg=_T, g_arg=_T, b_arg=_T)
    sig.update(m_arg=_T, v_arg=_T, s_arg=_T, vmax_arg=_T, numel_arg="i32")
    consts = dict(common, HAS_INF=True, HAS_SCALE=True, NSUM=2, RBLOCK=16, LR_T=True)
    consts.update(MAXIMIZE=True, USE_WD=True, DECOUPLED=True, AMSGRAD=True, STEPS_BLOCK=1024)
    print(json.dumps(_compile(adam_kernel, sig, consts, f"adam/{name}")))
    # The variant ops: float64 dot total, and a x + b y with the skip flag read.
    sig = dict(_BASE, out=part, counter="*i32", n_programs="i32", a_arg=_T, b_arg=_T)
    sig.update(numel_arg="i32")
    print(json.dumps(_compile(dot_kernel, sig, dict(plain, RBLOCK=1024), f"dot/{name}")))
    sig = dict(_BASE, coefs=part, skip="*fp32", o_arg=_T, x_arg=_T, y_arg=_T, numel_arg="i32")
    consts = dict(plain, HAS_SKIP=True)
    print(json.dumps(_compile(axpby_kernel, sig, consts, f"axpby/{name}")))


if __name__ == "__main__":
    main()
