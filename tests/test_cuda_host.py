"""The CUDA kernels' code, run on the CPU: the host build of ``csrc/cuda``.

``csrc/cuda/element_math.h`` (the per-element math: conversions, norm terms, perturbation with
masks and random bits, SGD, Adam/AdamW, axpby, the skip decision) and ``csrc/cuda/harness.h``
(the table image, the grid choice, the chunk and pack walks with 64-bit offsets, the 16-byte
decision, the reduction tree) are compiled by nvcc into the kernels and, here, by the host
compiler alone into ``csrc/cuda/host_driver.cc``'s small library (no CUDA toolkit, no torch;
``-ffp-contract=off`` as the CUDA build's ``--fmad=false``), which runs every block and thread
of the grid a GPU would get (by default an H100's 132 SMs x 4 resident blocks; the occupancy
API's answer is the one input the host cannot compute) over CPU tensors, the stream
workspace's ticket and the last block's finalize included.

What is compared, and how exactly:

* against :mod:`fused_sam.reference` at the dtype tolerances of the design (section 6), every op;
* bit for bit where the same math is done in the same order:
  - float64 storage: the kernels compute in float64 in the reference's order, so perturbation
    (one-element ``sumsq``, no random mask) and SGD equal the reference's bits; Adam/AdamW's
    moments too, and its weights equal the same float64 math with a correctly rounded sqrt
    (torch's CPU sqrt, which the reference calls, is not: it is 1 ulp off for some inputs);
  - axpby is float64 for every storage type: equal to the reference's bits;
  - float32/float16/bfloat16 storage: the kernels compute in float32, one rounding per
    operation; the same operations on float32 torch tensors (``_sgd_f32``, ``_perturb_f32``,
    ``_adam_math``) give the same bits;
  - norm and dot: each block's partial against a correctly rounded sum (``math.fsum``) of the
    block's own terms (which chunks a block owns is derived here from the grid stride) at
    1e-12, and the total bit for bit against the last block's order (``_finalize``, in Python
    floats); the reference's total at 1e-12;
  - the half/bfloat16 conversions against torch's, and the hash against fused_sam.masks'.

The GPU tests then only have to reproduce what this file already checked.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close

from fused_sam import reference as ref
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks import pack_bits
from fused_sam.masks.bits import RandomBits, element_hash, keep_threshold, tensor_salt

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 16  # kChunk
THREADS = 512  # kThreads
H100_BLOCKS = 132 * (2048 // THREADS)  # resident blocks of a 4-blocks-per-SM kernel on an H100
MAX_GRID = 1024  # kMaxGrid
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = list(DTYPE_CODE)
ODD = [1, 3, 4097, 65537]
CANARY = 1234.0  # around every test tensor in its storage (exact in every dtype)


# ---------------------------------------------------------------------------------------------
# The host build and a thin glue over it (what csrc/cuda/sam_cuda.cpp does with torch tensors)


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail("no C++ compiler found: the host build of the CUDA kernels needs one")
    out = tmp_path_factory.mktemp("cuda_host") / "fused_sam_cuda_host.so"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall",
         "-DFUSED_SAM_CUDA_HOST_BUILD", f"-I{ROOT / 'csrc'}",
         str(ROOT / "csrc" / "cuda" / "host_driver.cc"), "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.fsh_last_error.restype = ctypes.c_char_p
    lib.fsh_table.restype = ctypes.c_int64
    lib.fsh_workspace.restype = ctypes.c_uint
    return lib


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Host:
    """Calls the host build's launchers with tables built from tensor lists, like the glue
    (csrc/cuda/sam_cuda.cpp); the grid is what the occupancy API would give for
    ``resident_blocks`` blocks resident at once (at most one per chunk and kMaxGrid)."""

    def __init__(self, lib: ctypes.CDLL, resident_blocks: int = H100_BLOCKS) -> None:
        self.lib = lib
        self.resident_blocks = resident_blocks
        self.device_steps = True

    def _launch(self, fn, *args) -> None:
        self.lib.fsh_set_resident_blocks(self.resident_blocks)
        if fn(*args) != 0:
            raise RuntimeError(self.lib.fsh_last_error().decode())
        assert self.lib.fsh_workspace(None, 0) == 0, "the ticket is not back at zero"

    @staticmethod
    def _lists(rows: list[tuple[list | None, int]]):
        """rows of (tensors or values or None, kind) -> (n, int64 array, int32 kinds)."""
        n = max(len(r) for r, _ in rows if r is not None)
        flat = []
        for r, kind in rows:
            if r is None:
                flat += [0] * n
            elif kind == 3:
                flat += [int(v) for v in r]
            else:
                flat += [_addr(t) for t in r]
        arr = (ctypes.c_int64 * len(flat))(*flat)
        kinds = (ctypes.c_int * len(rows))(*[k if r is not None else 0 for r, k in rows])
        return ctypes.c_int64(n), arr, kinds

    @staticmethod
    def _numels(ts: list[torch.Tensor]):
        return (ctypes.c_int64 * len(ts))(*[t.numel() for t in ts])

    @staticmethod
    def _scalar(t: torch.Tensor | None, dtype=torch.float32):
        """A one-element tensor as (storage to keep alive, pointer), or (None, None)."""
        if t is None:
            return None, None
        v = t.reshape(1).to(dtype).contiguous()
        return v, ctypes.c_void_p(v.data_ptr())

    @staticmethod
    def _skip(sumsqs):
        """The sumsqs of a skip decision as (keep, count, addresses, lengths)."""
        keep = [s.double().contiguous() for s in sumsqs]
        addrs = (ctypes.c_int64 * max(len(keep), 1))(*[s.data_ptr() for s in keep])
        lens = (ctypes.c_int64 * max(len(keep), 1))(*[s.numel() for s in keep])
        return keep, len(keep), addrs, lens

    def table(self, ts, rows) -> tuple[list[int], int]:
        n, arr, kinds = self._lists(rows)
        self.lib.fsh_set_resident_blocks(self.resident_blocks)
        grid = ctypes.c_int(0)
        args = (n, self._numels(ts), len(rows), arr, kinds)
        size = self.lib.fsh_table(*args, None, ctypes.c_int64(0), ctypes.byref(grid))
        out = (ctypes.c_int64 * size)()
        self.lib.fsh_table(*args, out, ctypes.c_int64(size), ctypes.byref(grid))
        return list(out), grid.value

    def block_partials(self, grid: int) -> torch.Tensor:
        """The per-block partial sums the last norm/dot launch left in the workspace."""
        out = torch.empty(grid, dtype=torch.float64)
        self.lib.fsh_workspace(ctypes.c_void_p(out.data_ptr()), grid)
        return out

    def norm_sq_partials(self, grads, params, adaptive: bool, eta: float) -> torch.Tensor:
        out = torch.full((1,), math.nan, dtype=torch.float64)
        n, arr, kinds = self._lists([(grads, 1), (params if adaptive else None, 1)])
        self._launch(
            self.lib.fsh_norm_sq, DTYPE_CODE[grads[0].dtype], n, self._numels(grads), arr, kinds,
            int(adaptive), ctypes.c_double(eta), ctypes.c_void_p(out.data_ptr()),
        )  # fmt: skip
        return out

    def dot_partials(self, a, b) -> torch.Tensor:
        out = torch.full((1,), math.nan, dtype=torch.float64)
        n, arr, kinds = self._lists([(a, 1), (b, 1)])
        self._launch(
            self.lib.fsh_dot, DTYPE_CODE[a[0].dtype], n, self._numels(a), arr, kinds,
            ctypes.c_void_p(out.data_ptr()),
        )  # fmt: skip
        return out

    def perturb_(
        self,
        params,
        grads,
        backups,
        sumsq,
        rho,
        eps,
        adaptive,
        eta,
        masks,
        rho_device: torch.Tensor | None = None,
    ) -> None:
        mask_kind, step_key, threshold = 0, 0, 0
        mask_row: tuple[list | None, int] = (None, 0)
        if isinstance(masks, RandomBits):  # as fused_sam.backends.native passes a random mask
            rho = rho * masks.scale
            mask_kind, step_key, threshold = 2, masks.step_key, masks.threshold
            mask_row = (list(masks.salts), 3)
        elif masks is not None:
            mask_kind, mask_row = 1, (list(masks), 2)
        n, arr, kinds = self._lists([(params, 1), (grads, 1), (backups, 1), mask_row])
        s = sumsq.contiguous()
        _keep, rho_ptr = self._scalar(rho_device, torch.float64)
        self._launch(
            self.lib.fsh_perturb, DTYPE_CODE[params[0].dtype], n, self._numels(params), arr,
            kinds, mask_kind, ctypes.c_int64(step_key), ctypes.c_int64(threshold),
            ctypes.c_void_p(s.data_ptr()), int(s.dtype == torch.float64),
            ctypes.c_int64(s.numel()), ctypes.c_double(rho), rho_ptr, ctypes.c_double(eps),
            int(adaptive), ctypes.c_double(eta),
        )  # fmt: skip

    def restore_sgd_step_(
        self,
        params,
        grads,
        backups,
        bufs,
        hyper: SGDHyper,
        *,
        first_step,
        grad_scale,
        found_inf,
        sumsqs=(),
        lr_device=None,
    ) -> torch.Tensor:
        lr, wd, mu, damp, nesterov, maximize = hyper
        n, arr, kinds = self._lists(
            [(params, 1), (grads, 1), (backups, 1), (bufs if mu != 0 else None, 1)]
        )
        _keep_gs, gs = self._scalar(grad_scale)  # alive until the call returns
        _keep_fi, fi = self._scalar(found_inf)
        _keep_lr, lr_ptr = self._scalar(lr_device, torch.float64)
        _keep_s, count, addrs, lens = self._skip(sumsqs)
        flag = torch.tensor(True)  # the kernel writes it
        self._launch(
            self.lib.fsh_sgd, DTYPE_CODE[params[0].dtype], n, self._numels(params), arr, kinds,
            ctypes.c_double(lr), lr_ptr, ctypes.c_double(wd), ctypes.c_double(mu),
            ctypes.c_double(damp), int(nesterov), int(maximize), int(first_step), gs, fi, count,
            addrs, lens, ctypes.c_void_p(flag.data_ptr()),
        )  # fmt: skip
        return flag

    def restore_adam_step_(
        self,
        params,
        grads,
        backups,
        ms,
        vs,
        vmaxs,
        steps,
        hyper: AdamHyper,
        *,
        grad_scale,
        found_inf,
        sumsqs=(),
        lr_device=None,
    ) -> torch.Tensor:
        lr, b1, b2, eps, wd, amsgrad, maximize, decoupled = hyper
        _keep_gs, gs = self._scalar(grad_scale)  # alive until the call returns
        _keep_fi, fi = self._scalar(found_inf)
        _keep_lr, lr_ptr = self._scalar(lr_device, torch.float64)
        flag = torch.tensor(True)  # the kernel writes it
        flag_ptr = ctypes.c_void_p(flag.data_ptr())

        def launch(idx, counters, step_size=0.0, bc2=0.0, skip_inputs=True):
            lists = (params, grads, backups, ms, vs, vmaxs)
            pick = [[lst[i] for i in idx] if lst else None for lst in lists]
            rows = [(p, 1) for p in pick[:5]] + [(pick[5] if amsgrad else None, 1)]
            rows.append((counters, 2))
            n, arr, kinds = self._lists(rows)
            _keep_s, count, addrs, lens = self._skip(sumsqs if skip_inputs else ())
            self._launch(
                self.lib.fsh_adam, DTYPE_CODE[params[0].dtype], n, self._numels(pick[0]), arr,
                kinds, ctypes.c_double(lr), lr_ptr if counters is not None else None,
                ctypes.c_double(b1), ctypes.c_double(b2), ctypes.c_double(eps),
                ctypes.c_double(wd), int(amsgrad), int(maximize), int(decoupled),
                int(counters is not None), ctypes.c_double(step_size), ctypes.c_double(bc2), gs,
                fi if skip_inputs else None, count, addrs, lens, flag_ptr,
            )  # fmt: skip

        if self.device_steps:
            launch(list(range(len(params))), list(steps))
            return flag
        # Counters on the host: the glue's path (sam_cuda.cpp): the skip decided on the host,
        # then one launch per distinct count with the bias corrections computed there.
        if lr_device is not None:
            lr = float(lr_device)
        if ref.skipped(found_inf, sumsqs):
            n, arr, kinds = self._lists([(params, 1), (backups, 1)])
            self._launch(
                self.lib.fsh_restore, DTYPE_CODE[params[0].dtype], n, self._numels(params), arr,
                kinds,
            )  # fmt: skip
            return torch.tensor(True)
        by_step: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            s.add_(1)
            by_step.setdefault(float(s), []).append(i)
        for step, idx in by_step.items():
            bias = (ctypes.c_double * 2)()
            self.lib.fsh_adam_bias(
                ctypes.c_double(lr), ctypes.c_double(b1), ctypes.c_double(b2),
                ctypes.c_double(step), bias,
            )  # fmt: skip
            launch(idx, None, bias[0], bias[1], skip_inputs=False)
        return flag

    def axpby_(self, out, x, y, coefs: torch.Tensor, skip: torch.Tensor | None) -> None:
        _keep, flag = self._scalar(skip)  # alive until the call returns
        n, arr, kinds = self._lists([(out, 1), (x, 1), (y, 1)])
        self._launch(
            self.lib.fsh_axpby, DTYPE_CODE[out[0].dtype], n, self._numels(out), arr, kinds,
            ctypes.c_void_p(coefs.data_ptr()), ctypes.c_int64(coefs.stride(0)), flag,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inputs


def _tensor(numel: int, dtype: torch.dtype, offset: int = 0, scale: float = 1.0, gen=None):
    """A 1-D tensor of ``numel`` normal values starting ``offset`` elements into its storage
    (offset 1 makes it misaligned for 16-byte accesses)."""
    base = torch.full((numel + offset + 8,), CANARY, dtype=dtype)
    t = base[offset : offset + numel]
    assert numel == 0 or t.data_ptr() % 16 == (offset * t.element_size()) % 16
    t.copy_(torch.randn(numel, dtype=torch.float64, generator=gen) * scale)
    return t


def _untouched_outside(ts) -> None:
    """The storage around each view still holds the canary: nothing was written past a tensor's
    ends (a tail pack that stores lanes past n would)."""
    for t in ts:
        whole = t.new_empty(0).set_(t.untyped_storage())
        inside = torch.zeros(whole.numel(), dtype=torch.bool)
        inside[t.storage_offset() : t.storage_offset() + t.numel()] = True
        assert bool((whole[~inside] == CANARY).all()), "a write past the end of a tensor"


def _lists(sizes, dtype, count: int, seed: int, offsets=(0,), scale: float = 1.0):
    """``count`` lists of tensors of ``sizes``; tensor i starts ``offsets[i % len(offsets)]``
    elements into its storage."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [_tensor(n, dtype, offsets[i % len(offsets)], scale, gen) for i, n in enumerate(sizes)]
        for _ in range(count)
    ]


def _clone(ts):
    """Copies with the same storage offsets (so the same alignment) and canaries around them
    (every tensor the host build writes has some: a write past its end is caught, not a
    crash)."""
    out = []
    for t in ts:
        base = torch.full(
            (t.untyped_storage().nbytes() // t.element_size(),), CANARY, dtype=t.dtype
        )
        out.append(base.as_strided(t.size(), t.stride(), t.storage_offset()).copy_(t))
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits, except that any NaN equals any NaN (the conversions' NaN payloads)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    same = a.view(as_int) == b.view(as_int)
    return bool((same | (a.isnan() & b.isnan())).all())


def _assert_bits(actual, expected, what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if not _bits_equal(a, e):
            diff = (a.double() - e.double()).abs()
            raise AssertionError(
                f"{what}[{i}] ({a.dtype}, {a.numel()}): bits differ, "
                f"max |diff| {diff.max().item()} at {int(diff.argmax())}"
            )


def _op_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math type: float64 for float64 storage, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f(x: float, dtype: torch.dtype) -> torch.Tensor:
    """A host double converted to the math type (static_cast<Op> in the kernels)."""
    return torch.tensor(x, dtype=torch.float64).to(dtype)


#: Odd sizes, an empty tensor (it owns no chunk), and several chunks per tensor (9 in all).
SIZES = [1, 3, 0, 4097, 65537, 3 * CHUNK + 5]


@pytest.fixture
def host(lib) -> Host:
    return Host(lib)


# ---------------------------------------------------------------------------------------------
# Conversions and the hash


def test_conversions_match_torch(lib) -> None:
    """The host's half/bfloat16 conversions (element_math.h) give torch's bits: every 16-bit
    pattern to float32, and float32 values around every rounding boundary back."""
    bits16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, to_f, from_f in [
        (torch.float16, lib.fsh_half_to_float, lib.fsh_float_to_half),
        (torch.bfloat16, lib.fsh_bfloat16_to_float, lib.fsh_float_to_bfloat16),
    ]:
        got = torch.empty(bits16.numel(), dtype=torch.float32)
        to_f(ctypes.c_void_p(bits16.data_ptr()), ctypes.c_void_p(got.data_ptr()),
             ctypes.c_int64(bits16.numel()))  # fmt: skip
        assert _bits_equal(got, bits16.view(dtype).float()), dtype
        # Every representable value, the midpoints between neighbours (ties), one float32 ulp
        # either side of them, random bit patterns, and the edges (overflow, subnormals, NaN).
        v = bits16.view(dtype).float()
        v = v[v.isfinite()].sort().values.unique()
        mid = (v[:-1].double() + v[1:].double()) / 2
        mid32 = mid.float()
        near = torch.cat([mid32, mid32.nextafter(torch.tensor(math.inf)),
                          mid32.nextafter(torch.tensor(-math.inf))])  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        rand = torch.randint(-(2**31), 2**31, (200_000,), dtype=torch.int64, generator=gen)
        rand = rand.to(torch.int32)
        edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25,
                              1.5 * 2.0**-25, 2.0**-26, 3.4e38, math.inf, -math.inf, math.nan,
                              0.0, -0.0, 1e-45])  # fmt: skip
        x = torch.cat([v, near, rand.view(torch.float32), edges])
        got16 = torch.empty(x.numel(), dtype=torch.int16)
        from_f(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(got16.data_ptr()),
               ctypes.c_int64(x.numel()))  # fmt: skip
        want = x.to(dtype)
        assert _bits_equal(got16.view(dtype), want), dtype


def test_element_hash_matches_masks(lib) -> None:
    """element_math.h's hash is fused_sam.masks' (positions past 2^32 included)."""
    gen = torch.Generator().manual_seed(1)
    j = torch.cat([torch.arange(1000), torch.randint(0, 2**40, (1000,), generator=gen)])
    for key in (0, 1, 0x9E3779B9, 0xFFFFFFFF):
        got = torch.empty(j.numel(), dtype=torch.int32)
        lib.fsh_element_hash(
            ctypes.c_uint32(key), ctypes.c_void_p(j.data_ptr()), ctypes.c_void_p(got.data_ptr()),
            ctypes.c_int64(j.numel()),
        )  # fmt: skip
        assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, element_hash(key, j))


# ---------------------------------------------------------------------------------------------
# The table and the grid (harness.h: the glue's image, shared with sam_cuda.cpp)


def test_table_image_chunks_alignment_and_grid(host) -> None:
    """Chunk prefix sums, the per-tensor 16-byte decision (a misaligned tensor of any vectorised
    list takes the scalar path alone; masks do not take part) and the grid: the resident blocks,
    at most one per chunk, at least one, at most kMaxGrid."""
    sizes = [1, 0, CHUNK, CHUNK + 1, 3]
    a = [_tensor(n, torch.float32, off) for n, off in zip(sizes, [0, 0, 1, 0, 0])]
    b = [_tensor(n, torch.float32, off) for n, off in zip(sizes, [0, 0, 0, 0, 3])]
    masks = [pack_bits(torch.ones(max(n, 1), dtype=torch.bool))[1:] for n in sizes]  # odd addresses
    image, grid = host.table(a, [(a, 1), (b, 1), (masks, 2)])
    n = len(sizes)
    assert image[:n] == sizes
    assert image[n : 2 * n + 1] == [0, 1, 1, 2, 4, 5]  # first chunk of each tensor, then total
    assert image[2 * n + 1 : 3 * n + 1] == [1, 1, 0, 1, 0]
    assert image[3 * n + 1 : 4 * n + 1] == [t.data_ptr() for t in a]
    assert image[5 * n + 1 : 6 * n + 1] == [m.data_ptr() for m in masks]
    assert len(image) == 6 * n + 1  # nothing else: no kernel writes a table
    assert grid == 5
    assert Host(host.lib, resident_blocks=2).table(a, [(a, 1)])[1] == 2
    assert host.table([torch.empty(0)], [([torch.empty(0)], 1)])[1] == 1
    many = [torch.empty(1)] * (MAX_GRID + 7)
    assert Host(host.lib, resident_blocks=10**6).table(many, [(many, 1)])[1] == MAX_GRID


# ---------------------------------------------------------------------------------------------
# Norm and dot: per-block partials, then the last block's sum of them in block order


def _block_sums(terms: list[torch.Tensor], grid: int) -> list[float]:
    """Correctly rounded sums of the float64 terms of the chunks each block owns: chunk c (in
    tensor order, kChunk elements each) belongs to block c % grid."""
    owned: list[list[float]] = [[] for _ in range(grid)]
    c = 0
    for t in terms:
        for begin in range(0, t.numel(), CHUNK):
            owned[c % grid].extend(t[begin : begin + CHUNK].tolist())
            c += 1
    return [math.fsum(x) for x in owned]


def _block_sum(values: list[float]) -> float:
    """block_sum's order, in Python floats (IEEE float64: the same bits): a shuffle-down tree
    in every warp of 32 threads, then the same tree over the warp sums (zero past them)."""

    def warp(v: list[float]) -> float:
        for off in (16, 8, 4, 2, 1):
            v = [v[i] + (v[i + off] if i + off < 32 else v[i]) for i in range(32)]
        return v[0]

    sums = [warp(values[w : w + 32]) for w in range(0, len(values), 32)]
    return warp(sums + [0.0] * (32 - len(sums)))


def _finalize(partials: list[float]) -> float:
    """grid_sum's last block: thread k adds partials k, k + 512, ... from 0.0; block_sum."""
    per_thread = []
    for k in range(THREADS):
        x = 0.0
        for p in partials[k::THREADS]:
            x += p
        per_thread.append(x)
    return _block_sum(per_thread)


def _chunks(ts) -> int:
    return sum(-(-t.numel() // CHUNK) for t in ts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("resident", [H100_BLOCKS, 2])
def test_norm(host, dtype, adaptive, resident) -> None:
    """Each block's partial is the sum of its own chunks' terms (1e-12: only the order of the
    float64 additions differs); the total is the last block's sum of the partials in block_sum's
    order (bit for bit) and the reference's (1e-12)."""
    host.resident_blocks = resident
    g, w = _lists(SIZES, dtype, 2, seed=2, offsets=[0, 1])
    out = host.norm_sq_partials(g, w, adaptive, 0.01)
    grid = min(_chunks(g), resident)
    partials = host.block_partials(grid)
    terms = [((w_.double().abs() + 0.01 if adaptive else 1.0) * g_.double()) ** 2
             for g_, w_ in zip(g, w)]  # fmt: skip
    expected = torch.tensor(_block_sums(terms, grid), dtype=torch.float64)
    torch.testing.assert_close(partials, expected, rtol=1e-12, atol=0)
    assert out.item() == _finalize(partials.tolist())
    want = ref.norm_sq_partials(g, w, adaptive, 0.01)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot(host, dtype) -> None:
    a, b = _lists(SIZES, dtype, 2, seed=3, offsets=[1, 0])
    out = host.dot_partials(a, b)
    grid = min(_chunks(a), H100_BLOCKS)
    partials = host.block_partials(grid)
    terms = [x.double() * y.double() for x, y in zip(a, b)]
    expected = torch.tensor(_block_sums(terms, grid), dtype=torch.float64)
    torch.testing.assert_close(partials, expected, rtol=1e-12, atol=1e-300)
    assert out.item() == _finalize(partials.tolist())
    torch.testing.assert_close(out, ref.dot_partials(a, b), rtol=1e-11, atol=0)


def test_norm_of_empty_lists_nonfinite_and_huge_gradients(host) -> None:
    """An all-empty list still gets its total (0, from the one block); squares in float64:
    float32 values whose squares overflow float32 give a finite norm; an inf or NaN gradient
    makes the total non-finite."""
    assert host.norm_sq_partials([torch.empty(0)], [torch.empty(0)], False, 0.0).item() == 0.0
    g = [torch.full((5,), 3e38, dtype=torch.float32), torch.ones(4097, dtype=torch.float32)]
    assert math.isfinite(host.norm_sq_partials(g, g, False, 0.0).item())
    g[1][4000] = math.nan
    assert math.isnan(host.norm_sq_partials(g, g, False, 0.0).item())


# ---------------------------------------------------------------------------------------------
# Perturbation


def _perturb_f32(w, g, sumsq_value, rho, eps, adaptive, eta, keep):
    """The kernel's float32 math on torch float32 tensors, one rounding per operation."""
    op = torch.float32
    scale = _f(rho / (math.sqrt(sumsq_value) + eps), op)
    wf, gf = w.to(op), g.to(op)
    e = scale.expand_as(wf)
    if adaptive:
        t = wf.abs() + _f(eta, op)
        e = e * t * t
    e = e * gf
    if keep is not None:
        e = e * keep.to(op)
    return (wf + e).to(w.dtype)


def _masks_for(kind: str, params):
    gen = torch.Generator().manual_seed(7)
    if kind == "bits":
        return [pack_bits(torch.rand(p.numel(), generator=gen) < 0.5) for p in params]
    if kind == "random":
        salts = tuple(tensor_salt(i) for i in range(len(params)))
        return RandomBits(salts, 0x1234ABCD, keep_threshold(0.3), 1 / 0.3)
    return None


def _keep(kind, masks, i, p):
    if kind == "bits":
        shifts = torch.arange(8, dtype=torch.uint8)
        return ((masks[i].reshape(-1, 1) >> shifts) & 1).reshape(-1)[: p.numel()].bool()
    if kind == "random":
        return element_hash(masks.key(i), torch.arange(p.numel())) < masks.threshold
    return None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mask", ["none", "bits", "random"])
@pytest.mark.parametrize("resident", [H100_BLOCKS, 3])
def test_perturb(host, dtype, adaptive, mask, resident) -> None:
    """Against the reference, and bit for bit against the same math (3 resident blocks: each
    block walks several chunks, of different tensors)."""
    host.resident_blocks = resident
    w, g = _lists(SIZES, dtype, 2, seed=4, offsets=[0, 1])
    masks = _masks_for(mask, w)
    sumsq = torch.tensor([37.25], dtype=torch.float64)  # one partial: the same norm on both sides
    rho, eps, eta = 0.05, 1e-12, 0.01
    w_k, b_k = _clone(w), [_clone([t])[0].fill_(math.nan) for t in w]
    host.perturb_(w_k, g, b_k, sumsq, rho, eps, adaptive, eta, masks)
    w_r, b_r = _clone(w), [torch.empty_like(t) for t in w]
    ref.perturb_(w_r, g, b_r, sumsq, rho, eps, adaptive, eta, masks)
    _assert_bits(b_k, w, "backups")
    _untouched_outside(w_k + b_k)
    for a, e in zip(w_k, w_r):
        assert_close(a, e)
    if dtype == torch.float64 and mask != "random":
        _assert_bits(w_k, w_r, "float64 weights vs the reference")
    elif dtype != torch.float64:
        rho_k = rho * masks.scale if mask == "random" else rho
        want = [
            _perturb_f32(p, q, 37.25, rho_k, eps, adaptive, eta, _keep(mask, masks, i, p))
            for i, (p, q) in enumerate(zip(w, g))
        ]
        _assert_bits(w_k, want, "weights vs the float32 math")


def test_perturb_skips_a_nonfinite_norm(host) -> None:
    """A non-finite norm leaves the weights bit-identical; the backup is written anyway."""
    for bad in (math.inf, math.nan):
        w, g = _lists([4097, 3], torch.bfloat16, 2, seed=5, offsets=[1, 0])
        w_k, b = _clone(w), [_clone([t])[0].zero_() for t in w]
        host.perturb_(w_k, g, b, torch.tensor([1.0, bad]), 0.05, 1e-12, False, 0.0, None)
        _assert_bits(w_k, w, "weights")
        _assert_bits(b, w, "backups")


def test_zero_gradient_perturbs_by_exactly_zero(host) -> None:
    w, _ = _lists([65537], torch.float32, 2, seed=6)
    g = [torch.zeros_like(w[0])]
    w_k, b = _clone(w), _clone(w)
    host.perturb_(w_k, g, b, torch.zeros(3, dtype=torch.float64), 0.05, 1e-12,
                  True, 0.01, None)  # fmt: skip
    _assert_bits(w_k, w, "weights")


# ---------------------------------------------------------------------------------------------
# Restore + SGD


def _sgd_f32(w, g, buf, hyper: SGDHyper, first_step, grad_scale):
    op = torch.float32
    lr, wd, mu, damp, nesterov, maximize = hyper
    d, wf = g.to(op), w.to(op)
    if grad_scale is not None:
        d = d / grad_scale.to(op)
    if maximize:
        d = -d
    if wd != 0:
        d = d + _f(wd, op) * wf
    new_buf = None
    if mu != 0:
        m = _f(mu, op)
        v = d if first_step else m * buf.to(op) + _f(1.0 - damp, op) * d
        new_buf = v.to(w.dtype)
        d = d + m * v if nesterov else v
    return (wf - _f(lr, op) * d).to(w.dtype), new_buf


SGD_CASES = [
    SGDHyper(0.1, 0.0, 0.0, 0.0, False, False),
    SGDHyper(0.1, 5e-4, 0.9, 0.0, False, False),
    SGDHyper(0.1, 5e-4, 0.9, 0.0, True, False),
    SGDHyper(0.05, 1e-2, 0.8, 0.25, False, True),
    SGDHyper(0.05, 0.0, 0.9, 0.0, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hyper", SGD_CASES, ids=lambda h: f"wd{h[1]}-mu{h[2]}-d{h[3]}-n{int(h[4])}-max{int(h[5])}"
)
@pytest.mark.parametrize("amp", [False, True])
def test_restore_sgd_step(host, dtype, hyper, amp) -> None:
    """Two steps (the first fills the momentum buffers) from perturbed weights."""
    w, g, b, buf = _lists(SIZES, dtype, 4, seed=8, offsets=[0, 1])
    grad_scale = torch.tensor(1024.0) if amp else None
    if amp:
        g = [t * 1024 for t in g]
    w_k, buf_k, w_r, buf_r = _clone(w), _clone(buf), _clone(w), _clone(buf)
    for first_step in (True, False):
        bufs_k = buf_k if hyper.momentum else []
        bufs_r = buf_r if hyper.momentum else []
        want32 = [
            _sgd_f32(bb, gg, vv, hyper, first_step, grad_scale) for bb, gg, vv in zip(b, g, buf_k)
        ]
        finite = [torch.tensor([1.0, 2.0], dtype=torch.float64)]  # checked, finite: no skip
        flag = host.restore_sgd_step_(w_k, g, b, bufs_k, hyper, first_step=first_step,
                                      grad_scale=grad_scale, found_inf=torch.tensor(0.0),
                                      sumsqs=finite)  # fmt: skip
        assert flag.dtype == torch.bool and not flag
        skipped = ref.restore_sgd_step_(w_r, g, b, bufs_r, hyper, first_step=first_step,
                                        grad_scale=grad_scale, found_inf=None)  # fmt: skip
        assert not bool(skipped)
        _untouched_outside(w_k + bufs_k)
        for a, e in zip(w_k + bufs_k, w_r + bufs_r):
            assert_close(a, e)
        if dtype == torch.float64:
            _assert_bits(w_k + bufs_k, w_r + bufs_r, "float64 weights and buffers vs reference")
        else:
            _assert_bits(w_k, [x for x, _ in want32], "weights vs the float32 math")
            if hyper.momentum:
                _assert_bits(buf_k, [v for _, v in want32], "buffers vs the float32 math")
        w_r, buf_r = _clone(w_k), _clone(buf_k)  # the next step starts from the same bits


#: Skip inputs: found_inf set, or the first or the second of two checked norms not finite.
SKIPS = {
    "found_inf": (torch.tensor(1.0), [torch.tensor([1.0])]),
    "g1": (torch.tensor(0.0), [torch.tensor([1.0, math.inf]), torch.tensor([1.0])]),
    "g2": (None, [torch.tensor([1.0]), torch.tensor([math.nan, 2.0])]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("why", list(SKIPS))
def test_restore_sgd_skip_only_restores(host, dtype, why) -> None:
    """found_inf, or a non-finite total of either checked norm: the weights restored, the
    buffers untouched, the flag set (and clear again on the next normal step)."""
    w, g, b, buf = _lists(ODD, dtype, 4, seed=9, offsets=[1, 0])
    w_k, buf_k = _clone(w), _clone(buf)
    found_inf, sumsqs = SKIPS[why]
    flag = host.restore_sgd_step_(w_k, g, b, buf_k, SGD_CASES[1], first_step=False,
                                  grad_scale=None, found_inf=found_inf,
                                  sumsqs=sumsqs)  # fmt: skip
    assert bool(flag)
    _assert_bits(w_k, b, "weights")
    _assert_bits(buf_k, buf, "buffers")
    flag = host.restore_sgd_step_(w_k, g, b, buf_k, SGD_CASES[1], first_step=False,
                                  grad_scale=None, found_inf=None)  # fmt: skip
    assert not bool(flag)


def test_param_as_its_own_backup(host) -> None:
    """The restore is skipped for a tensor that is its own backup (w == b): a plain step."""
    w, g = _lists([4097], torch.float32, 2, seed=10)
    w_r = _clone(w)
    hyper = SGD_CASES[0]
    host.restore_sgd_step_(w, g, w, [], hyper, first_step=True, grad_scale=None, found_inf=None)
    ref.restore_sgd_step_(w_r, g, w_r, [], hyper, first_step=True, grad_scale=None,
                          found_inf=None)  # fmt: skip
    assert_close(w[0], w_r[0])


# ---------------------------------------------------------------------------------------------
# Restore + Adam / AdamW


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (sqrtf/sqrt in the kernels, on both sides; torch's CPU
    sqrt is not: it differs in the last bit for a fraction of float32 and float64 inputs)."""
    return torch.from_numpy(np.sqrt(x.numpy()))


def _adam_math(w, g, m, v, vmax, hyper: AdamHyper, step: float, grad_scale):
    """The kernel's math in its math type (float64 for float64 storage: then it is the
    reference's formula and order, with a correctly rounded sqrt)."""
    op = _op_dtype(w.dtype)
    lr, b1, b2, eps, wd, amsgrad, maximize, decoupled = hyper
    step_size = _f(lr / (1.0 - b1**step), op)
    bc2 = _f(math.sqrt(1.0 - b2**step), op)
    wf, gf = w.to(op), g.to(op)
    if grad_scale is not None:
        gf = gf / grad_scale.to(op)
    if maximize:
        gf = -gf
    if wd != 0:
        if decoupled:
            wf = wf * _f(1.0 - lr * wd, op)
        else:
            gf = gf + _f(wd, op) * wf
    mf = _f(b1, op) * m.to(op) + _f(1.0 - b1, op) * gf
    vf = _f(b2, op) * v.to(op) + _f(1.0 - b2, op) * gf * gf
    second = torch.maximum(vmax.to(op), vf) if amsgrad else vf
    denom = _sqrt(second) / bc2 + _f(eps, op)
    out = (wf - step_size * mf / denom).to(w.dtype)
    return out, mf.to(w.dtype), vf.to(w.dtype), second.to(w.dtype)


ADAM_CASES = [
    AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False),
    AdamHyper(1e-3, 0.9, 0.999, 1e-8, 1e-2, False, False, True),
    AdamHyper(1e-3, 0.8, 0.99, 1e-6, 1e-2, True, False, False),
    AdamHyper(2e-3, 0.9, 0.999, 1e-8, 5e-2, True, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hyper", ADAM_CASES, ids=lambda h: f"wd{h[4]}-ams{int(h[5])}-max{int(h[6])}-w{int(h[7])}"
)
@pytest.mark.parametrize("steps_on", ["device", "host"])
def test_restore_adam_step(host, dtype, hyper, steps_on) -> None:
    """Three steps from perturbed weights; counters read and advanced in the kernel (device) or
    by the glue (host), and scaled gradients on the last one."""
    w, g, b, m, v = _lists(SIZES, dtype, 5, seed=11, offsets=[0, 1])
    v = [t.abs_() for t in v]  # in place: the storage keeps its canaries
    vmax = [_clone([t])[0].mul_(1.5) for t in v]
    state_k = [_clone(x) for x in (w, m, v, vmax)]
    state_r = [_clone(x) for x in (w, m, v, vmax)]
    steps_k = [torch.tensor(float(i % 2), dtype=torch.float32) for i in range(len(w))]
    steps_r = [s.clone() for s in steps_k]
    host.device_steps = steps_on == "device"
    for k in range(3):
        grad_scale = torch.tensor(256.0) if k == 2 else None
        gk = [t * 256 for t in g] if k == 2 else g
        vmax_k = state_k[3] if hyper.amsgrad else []
        vmax_r = state_r[3] if hyper.amsgrad else []
        want = [
            _adam_math(bb, gg, mm, vv, xx, hyper, float(s) + 1, grad_scale)
            for bb, gg, mm, vv, xx, s in zip(b, gk, state_k[1], state_k[2], state_k[3], steps_k)
        ]
        flag = host.restore_adam_step_(state_k[0], gk, b, state_k[1], state_k[2], vmax_k,
                                       steps_k, hyper, grad_scale=grad_scale, found_inf=None,
                                       sumsqs=[torch.tensor([3.0])])  # fmt: skip
        assert not flag
        ref.restore_adam_step_(state_r[0], gk, b, state_r[1], state_r[2], vmax_r, steps_r, hyper,
                               grad_scale=grad_scale, found_inf=None)  # fmt: skip
        assert [float(s) for s in steps_k] == [float(s) for s in steps_r]
        _untouched_outside([t for lst in state_k for t in lst])
        lists_k = state_k[:3] + ([vmax_k] if hyper.amsgrad else [])
        lists_r = state_r[:3] + ([vmax_r] if hyper.amsgrad else [])
        for a_list, e_list in zip(lists_k, lists_r):
            for a, e in zip(a_list, e_list):
                assert_close(a, e)
        for j, name in enumerate(["weights", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]):
            if j < 3 or hyper.amsgrad:
                _assert_bits(state_k[j], [x[j] for x in want], f"{name} vs the kernel math")
        if dtype == torch.float64:  # the moments are the reference's bits (no sqrt in them)
            _assert_bits(state_k[1] + state_k[2], state_r[1] + state_r[2], "moments vs reference")
        state_r = [_clone(x) for x in state_k]  # the next step starts from the same bits


@pytest.mark.parametrize("steps_on", ["device", "host"])
@pytest.mark.parametrize("why", list(SKIPS))
def test_restore_adam_skip_only_restores(host, steps_on, why) -> None:
    """As for SGD, and the step counters stay where they were."""
    w, g, b, m, v = _lists(ODD, torch.bfloat16, 5, seed=12, offsets=[1, 0])
    state = [_clone(x) for x in (w, m, v)]
    steps = [torch.tensor(3.0) for _ in w]
    host.device_steps = steps_on == "device"
    found_inf, sumsqs = SKIPS[why]
    flag = host.restore_adam_step_(state[0], g, b, state[1], state[2], [], steps, ADAM_CASES[1],
                                   grad_scale=None, found_inf=found_inf,
                                   sumsqs=sumsqs)  # fmt: skip
    assert bool(flag)
    _assert_bits(state[0], b, "weights")
    _assert_bits(state[1] + state[2], m + v, "moments")
    assert all(float(s) == 3.0 for s in steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyperparameters_read_on_the_device(host, dtype) -> None:
    """lr (SGD, Adam with device counters) and rho given as device values (what a CUDA graph
    replays) give the bits of the same values given as arguments."""
    w, g, b, buf, m, v = _lists(SIZES[:5], dtype, 6, seed=14, offsets=[1, 0])
    v = [t.abs_() for t in v]
    lr = torch.tensor(0.0375, dtype=torch.float64)
    runs = []
    for device in (False, True):
        ws, bufs = _clone(w), _clone(buf)
        host.restore_sgd_step_(ws, g, b, bufs, SGD_CASES[2]._replace(lr=99.0 if device else 0.0375),
                               first_step=True, grad_scale=None, found_inf=None,
                               lr_device=lr if device else None)  # fmt: skip
        wa, ms, vs = _clone(w), _clone(m), _clone(v)
        steps = [torch.tensor(2.0) for _ in w]
        hyper = ADAM_CASES[1]._replace(lr=99.0 if device else 0.0375)
        host.restore_adam_step_(wa, g, b, ms, vs, [], steps, hyper, grad_scale=None,
                                found_inf=None, lr_device=lr if device else None)  # fmt: skip
        wp, bp = _clone(w), _clone(w)
        host.perturb_(wp, g, bp, torch.tensor([9.0]), 99.0 if device else 0.05, 1e-12, True, 0.01,
                      None, rho_device=torch.tensor(0.05) if device else None)  # fmt: skip
        runs.append(ws + bufs + wa + ms + vs + wp)
    _assert_bits(runs[1], runs[0], "device hyperparameters")


# ---------------------------------------------------------------------------------------------
# axpby (float64 math for every storage type: the reference's bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", ["none", "x"])
def test_axpby(host, dtype, alias) -> None:
    x, y = _lists(SIZES, dtype, 2, seed=13, offsets=[1, 0])
    coefs = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out_k = _clone(x) if alias == "x" else [_clone([t])[0].zero_() for t in y]
    x_k = out_k if alias == "x" else x
    host.axpby_(out_k, x_k, y, coefs, None)
    _untouched_outside(out_k)
    out_r = [torch.empty_like(t) for t in x]
    ref.axpby_(out_r, x, y, coefs, None)
    _assert_bits(out_k, out_r, "axpby vs the reference")
    strided = torch.tensor([0.5, 9.0, 2.0], dtype=torch.float64)[::2]  # coefs stride 2
    host.axpby_(out_k, x, y, strided, torch.tensor(1.0))  # skipped: nothing written
    _assert_bits(out_k, out_r, "a skipped axpby")
    host.axpby_(out_k, x, y, strided, torch.tensor(0.0))
    ref.axpby_(out_r, x, y, strided.contiguous(), None)
    _assert_bits(out_k, out_r, "axpby with strided coefficients")


# ---------------------------------------------------------------------------------------------
# 64-bit offsets: the walk over tensors past 2^31 elements (no memory behind them)


def _walk(lib, numels, aligned, grid, block, thread, v):
    n = len(numels)
    args = (
        ctypes.c_int64(n), (ctypes.c_int64 * n)(*numels), (ctypes.c_int * n)(*aligned),
        ctypes.c_int64(grid), ctypes.c_int64(block), ctypes.c_int64(thread), ctypes.c_int(v),
    )  # fmt: skip
    lib.fsh_walk.restype = ctypes.c_int64
    count = lib.fsh_walk(*args, None, ctypes.c_int64(0))
    out = (ctypes.c_int64 * (3 * count))()
    lib.fsh_walk(*args, out, ctypes.c_int64(3 * count))
    return [tuple(out[3 * k : 3 * k + 3]) for k in range(count)]


@pytest.mark.parametrize("v", [2, 4, 8])
def test_walk_past_2_to_the_31(lib, v) -> None:
    """Chunk offsets and pack indices past 2^31 (and 2^32) elements: the chunks after a huge
    tensor, and its last, partial chunk with a partial pack, land where int64 math puts them."""
    big = 3 * 2**31 + 2 * v + 1  # ends in a partial pack of 1 lane
    numels = [5, big, 3]
    chunks = [1, -(-big // CHUNK), 1]
    grid = 528
    last_chunk = chunks[0] + chunks[1] - 1  # the huge tensor's last chunk
    block = last_chunk % grid
    begin = (chunks[1] - 1) * CHUNK
    # A thread's packs of the last chunk start at begin + thread * v, stride 512 v; the thread
    # of the tail pack gets a 1-lane pack at the last element.
    tail_thread = ((big - 1 - begin) // v) % THREADS
    for thread in (0, 1, tail_thread):
        got = [p for p in _walk(lib, numels, [1, 1, 1], grid, block, thread, v) if p[1] >= begin]
        want = [(1, i, min(v, big - i)) for i in range(begin + thread * v, big, THREADS * v)]
        assert got == want and got, thread
    assert got[-1] == (1, big - 1, 1)
    # Off the vector path: one element per pack, stride 512.
    got = [p for p in _walk(lib, numels, [1, 0, 1], grid, block, 7, v) if p[1] >= begin]
    assert got == [(1, i, 1) for i in range(begin + 7, big, THREADS)]
    # The tensor after the huge one: chunk index past the huge tensor's, element 0 onwards.
    after = chunks[0] + chunks[1]
    got = _walk(lib, numels, [1, 1, 1], grid, after % grid, 0, v)
    assert (2, 0, min(v, 3)) in got


# ---------------------------------------------------------------------------------------------
# The sharing itself


def test_kernels_and_host_build_call_the_shared_functions() -> None:
    """The CUDA kernels and the host build both call every shared function (a kernel that
    went back to its own copy of the math would leave the host build testing something else).
    The per-element math and the indexing live only in element_math.h and harness.h."""
    cuda = "\n".join(
        (ROOT / "csrc" / "cuda" / f).read_text() for f in ("sam_kernels.cu", "multi_tensor.cuh")
    )
    host = (ROOT / "csrc" / "cuda" / "host_driver.cc").read_text()
    shared = [
        "norm_sq_term(", "dot_term(", "perturb_scale(", "perturb_value<", "mask_bit(",
        "element_hash(", "total_of(", "step_skipped(", "sgd_coefs<", "sgd_value(",
        "adam_coefs<", "adam_bias(", "adam_value(", "axpby_value(", "walk_chunks(",
        "walk_packs<", "warp_tree(", "launch_grid(",
    ]  # fmt: skip
    for name in shared:
        assert name in cuda, f"the CUDA kernels no longer call {name}"
        assert name in host, f"the host build no longer calls {name}"
    for own_copy in ("0x85EBCA6B", "fmix", "__shfl_down_sync(0xffffffffu, x, off)", "pow("):
        assert own_copy not in (ROOT / "csrc" / "cuda" / "sam_kernels.cu").read_text(), own_copy


# ---------------------------------------------------------------------------------------------
# On a GPU: the CUDA build reproduces the host build's bits


def _cuda_twin(t: torch.Tensor) -> torch.Tensor:
    """A CUDA copy of ``t`` with its storage offset (so the same 16-byte decision)."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    base = torch.full((numel,), CANARY, dtype=t.dtype, device="cuda")
    return base.as_strided(t.size(), t.stride(), t.storage_offset()).copy_(t)


def _bits_match(cuda: list[torch.Tensor], cpu: list[torch.Tensor], what: str) -> None:
    _assert_bits([t.cpu() for t in cuda], cpu, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_reproduces_the_host_bits(host, dtype) -> None:
    """Every op of a SAM step on the CUDA build gives the bits of the host build on the same
    inputs. The tensors hold 9 chunks, so every kernel's grid (resident blocks, at most one per
    chunk) is 9 blocks on any GPU with 9 SMs or more: the norm's partials group alike. Adam runs
    with step counters on the CPU (bias corrections from the host's pow on both sides)."""
    if not torch.cuda.is_available():
        pytest.fail("-m gpu selected but torch sees no CUDA device")
    ops = torch.ops.fused_sam
    w, g, g2, buf, m, v = _lists(SIZES, dtype, 6, seed=15, offsets=[0, 1])
    v = [t.abs_() for t in v]
    cw, cg, cg2, cbuf, cm, cv = ([_cuda_twin(t) for t in x] for x in (w, g, g2, buf, m, v))
    # norm of g1 (ASAM)
    total = host.norm_sq_partials(g, w, True, 0.01)
    ctotal = ops.norm_sq_partials(cg, cw, True, 0.01)
    _bits_match([ctotal], [total], "norm")
    # perturb with a random mask
    masks = _masks_for("random", w)
    b, cb = _clone(w), [_cuda_twin(t) for t in w]
    host.perturb_(w, g, b, total, 0.05, 1e-12, True, 0.01, masks)
    ops.perturb_(cw, cg, cb, ctotal, 0.05 * masks.scale, 1e-12, True, 0.01, [],
                 list(masks.salts), masks.step_key, masks.threshold)  # fmt: skip
    _bits_match(cw + cb, w + b, "perturb")
    # restore + SGD (momentum, nesterov, weight decay, loss scale, checked norms)
    gs = torch.tensor(64.0)
    hyper = SGD_CASES[2]
    sumsq = [total]
    flag = host.restore_sgd_step_(w, g2, b, buf, hyper, first_step=False, grad_scale=gs,
                                  found_inf=torch.tensor(0.0), sumsqs=sumsq)  # fmt: skip
    cflag = ops.restore_sgd_step_(cw, cg2, cb, cbuf, lr=hyper.lr, weight_decay=hyper.weight_decay,
                                  momentum=hyper.momentum, dampening=hyper.dampening,
                                  nesterov=hyper.nesterov, maximize=hyper.maximize,
                                  first_step=False, grad_scale=gs.cuda(),
                                  found_inf=torch.zeros((), device="cuda"),
                                  sumsqs=[ctotal])  # fmt: skip
    assert not bool(flag) and not bool(cflag)
    _bits_match(cw + cbuf, w + buf, "restore + SGD")
    # restore + AdamW (amsgrad), step counters on the CPU
    hyper_a = ADAM_CASES[3]
    vmax, cvmax = _clone(v), [_cuda_twin(t) for t in v]
    steps = [torch.tensor(4.0) for _ in w]
    csteps = [torch.tensor(4.0) for _ in w]
    host.device_steps = False
    host.restore_adam_step_(w, g2, b, m, v, vmax, steps, hyper_a, grad_scale=None,
                            found_inf=None, sumsqs=sumsq)  # fmt: skip
    ops.restore_adam_step_(cw, cg2, cb, cm, cv, cvmax, csteps, lr=hyper_a.lr, beta1=hyper_a.beta1,
                           beta2=hyper_a.beta2, eps=hyper_a.eps,
                           weight_decay=hyper_a.weight_decay, amsgrad=hyper_a.amsgrad,
                           maximize=hyper_a.maximize,
                           decoupled_weight_decay=hyper_a.decoupled_weight_decay,
                           grad_scale=None, found_inf=None, sumsqs=[ctotal])  # fmt: skip
    _bits_match(cw + cm + cv + cvmax, w + m + v + vmax, "restore + AdamW")
    assert [float(s) for s in csteps] == [float(s) for s in steps]
    # the variants' ops
    dot, cdot = host.dot_partials(g, g2), ops.dot_partials(cg, cg2)
    _bits_match([cdot], [dot], "dot")
    coefs = torch.tensor([0.75, -0.5], dtype=torch.float64)
    host.axpby_(g, g, g2, coefs, None)
    ops.axpby_(cg, cg, cg2, coefs.cuda(), None)
    _bits_match(cg, g, "axpby")
