"""Pointer tables, launch geometry and the device helpers shared by every Triton kernel family.

One launch covers every tensor of a ``(device, dtype)`` bucket. The host describes the bucket
in a single ``int64`` tensor, the *table*, laid out as::

    [ chunk -> tensor (n_chunks) | chunk -> start (n_chunks) | numel (n) | vector (n)
      | list 0 addr (n) | list 1 addr (n) | ... ]

Program ``pid`` of a launch handles elements ``[start, start + chunk)`` of tensor
``table[pid]``, looping over that range in ``BLOCK``-sized steps: full blocks without a mask,
then at most one masked tail block. ``vector[i]`` is 1 when every vector-accessed address of
tensor ``i`` is 16-byte aligned: the 16-byte access decision is per tensor (see
:attr:`Table.vector`). A launch may have more programs than chunks (one program for a bucket of
empty tensors, which still writes its outputs); those programs get an empty span. Addresses
are stored as integers and turned back into typed pointers on the device (``int64 ->
tl.pointer_type``), which the compiler and the interpreter both support, so the same kernels run
compiled on CUDA and interpreted on CPU.

Tables are cached by the addresses, sizes and strides of every tensor they encode (the table is
a pure function of that key, computed in one C++ pass by :func:`table_key`), so a steady-state
step does no host-to-device copy and no per-tensor Python work; a ``data_ptr()`` that moved (a
gradient freed by ``zero_grad(set_to_none=True)`` and reallocated elsewhere) builds a new one.
"""

# No ``from __future__ import annotations``: the jit helpers below keep object annotations, as
# the kernel modules do.

import importlib
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRETED",
    "VECTOR_ALL",
    "VECTOR_NONE",
    "VECTOR_PER_TENSOR",
    "Geometry",
    "Table",
    "acc_dtype",
    "block_flag",
    "cache_info",
    "chunk_span",
    "clear_cache",
    "counter",
    "f64",
    "geometry",
    "pointer",
    "pointer_table",
    "table_key",
    "tl_dtype",
]


def _interpreted() -> bool:
    # Kernels are bound to the interpreter when @triton.jit runs, i.e. at import of this
    # package; later changes of TRITON_INTERPRET do not affect them.
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    @triton.jit
    def _probe() -> None:
        pass

    return isinstance(_probe, InterpretedFunction)


#: Whether the kernels of this package were created for the Triton interpreter.
INTERPRETED: bool = _interpreted()

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a supported floating-point ``dtype``."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"the Triton kernels take float16/bfloat16/float32/float64, not {dtype}"
        ) from None


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Compute type: float64 for float64 tensors, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Geometry:
    """Launch shape of one call.

    Attributes:
        block: elements per vector step (``BLOCK``, a power of two; a compile-time constant).
        chunk: elements per program, a multiple of ``block`` (a runtime argument).
    """

    block: int
    chunk: int


# The interpreter pays per operation and per call of a jit function (it re-patches
# triton.language on every nested call), not per element: wide blocks and few programs keep
# the CI suite fast, while 4 blocks per chunk still give the shared test sizes (4097, 65537)
# several programs per tensor, several full blocks per program and a masked tail.
_INTERPRETED_BLOCK = 4096
_INTERPRETED_CHUNK = 4 * _INTERPRETED_BLOCK

# On a GPU: 1024 elements per step for Triton's default 4 warps is 8 per thread (two 16-byte
# vectors in fp32).
# Chunks of 16 blocks amortise the per-program prologue (table reads); they grow with the
# bucket so that the partials the last program of a norm launch reduces stay at most ~4096.
_GPU_BLOCK = 1024
_GPU_MIN_CHUNK = 16 * _GPU_BLOCK
_MAX_CHUNKS = 4096


def geometry(total_numel: int) -> Geometry:
    """Block and chunk for a bucket of ``total_numel`` elements."""
    if INTERPRETED:
        return Geometry(_INTERPRETED_BLOCK, _INTERPRETED_CHUNK)
    chunk = _GPU_MIN_CHUNK
    while total_numel > chunk * _MAX_CHUNKS:
        chunk *= 2
    return Geometry(_GPU_BLOCK, chunk)


#: ``Table.vector`` values (the ``ALIGNED`` constant of a launch): no tensor's addresses are
#: 16-byte aligned, all are, or some are (each program then reads its tensor's flag).
VECTOR_NONE, VECTOR_ALL, VECTOR_PER_TENSOR = 0, 1, 2


@dataclass(frozen=True)
class Table:
    """A device-resident pointer table for one call, and the launch shape it was built for.

    Attributes:
        data: the ``int64`` table described in the module docstring.
        n_tensors: tensors per list (``n``).
        n_chunks: programs of a launch over the table (``n_chunks``).
        vector: the ``ALIGNED`` constant of a launch over the table: :data:`VECTOR_ALL` when
            every address of every vector list is 16-byte aligned (loads and stores may be
            vectorised), :data:`VECTOR_NONE` when none of the tensors' addresses are, and
            :data:`VECTOR_PER_TENSOR` when some are: each program then reads its tensor's row
            of flags and takes the vector path when its tensor's addresses allow it, so one
            misaligned tensor does not turn off 16-byte access for the others.
        block: elements per vector step (``BLOCK``).
        chunk: elements per program.
        host: the pinned host copy a table made during CUDA graph capture is uploaded from
            (each replay copies it again, so it must outlive the graph); ``None`` otherwise.
    """

    data: Tensor
    n_tensors: int
    n_chunks: int
    vector: int
    block: int = _INTERPRETED_BLOCK
    chunk: int = _INTERPRETED_CHUNK
    host: Tensor | None = None

    @property
    def aligned(self) -> bool:
        """Every address of every vector list is 16-byte aligned."""
        return self.vector == VECTOR_ALL


_CACHE: OrderedDict[Hashable, Table] = OrderedDict()
_CACHE_SIZE = 64
#: Tables a CUDA graph captured (made or reused during its capture), kept for the life of the
#: process: every replay reads them.
_CAPTURED: list[Table] = []


def clear_cache() -> None:
    """Drop every cached table (they are rebuilt on demand)."""
    _CACHE.clear()


def cache_info() -> tuple[int, int]:
    """``(entries, capacity)`` of the table cache."""
    return len(_CACHE), _CACHE_SIZE


try:  # the native extension's one-pass layout key (a plain Python key without it)
    # By module name, as backends/native.py does: ``from fused_sam import _C`` would import
    # the package (the layers contract of import-linter forbids a backend that).
    _layout_bytes = importlib.import_module("fused_sam._C").layout_key
except (ImportError, AttributeError):  # pragma: no cover - installs without the extension
    _layout_bytes = None


def table_key(lists: Sequence[Sequence[Tensor] | Sequence[int]], vector_rows: int) -> Hashable:
    """What a table of ``lists`` depends on, as one comparable value.

    Every tensor's address, dtype, device, sizes and strides (one pass in C++ over all lists
    with the native extension, :func:`fused_sam._C.layout_key`; a Python pass without it),
    the int lists as they are, and how many lists count for the alignment decision. The chunk
    size is a function of the sizes, so it needs no place of its own.
    """
    tensors: list[Tensor] = []
    ints: list[tuple[int, ...]] = []
    for lst in lists:
        if lst and isinstance(lst[0], int):
            ints.append(tuple(lst))
        else:
            tensors += lst
    if _layout_bytes is not None:
        layout = _layout_bytes(tensors)[0]
    else:  # pragma: no cover - installs without the extension
        layout = tuple((t.data_ptr(), t.device, t.dtype, t.shape, t.stride()) for t in tensors)
    return (len(lists), vector_rows, layout, *ints)


def pointer_table(
    lists: Sequence[Sequence[Tensor] | Sequence[int]],
    device: torch.device,
    *,
    vector_rows: int | None = None,
) -> Table:
    """The (cached) table of ``lists`` and the launch shape of its bucket.

    Args:
        lists: tensor lists of one call; ``lists[j][i]`` is the ``i``-th tensor of list ``j``.
            ``lists[0]`` gives the element counts (``numel``) of the schedule (mask lists hold
            bytes). A list of ints is stored as it is (per-tensor values, e.g. a random mask's
            salts).
        device: where the table lives (the tensors' device).
        vector_rows: how many leading lists are accessed as vectors of the storage type and so
            take part in the alignment decision (default: all tensor lists). Lists after them
            (bit masks, step counters) are read otherwise.

    A hit is found from :func:`table_key` alone (no per-tensor Python work); a miss, or a
    ``data_ptr()`` that moved (a gradient freed by ``zero_grad(set_to_none=True)`` and
    reallocated elsewhere), builds a new table.
    """
    rows = len(lists) if vector_rows is None else vector_rows
    key = table_key(lists, rows)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    table = _CACHE.get(key)
    if table is not None:
        _CACHE.move_to_end(key)
        if capturing and not any(kept is table for kept in _CAPTURED):
            # Made before the capture, read by the graph at every replay: eviction from the
            # cache must not free it.
            _CAPTURED.append(table)
        return table
    table = _build(lists, device, rows, capturing)
    if capturing:
        _CAPTURED.append(table)  # the graph reads it at every replay: never evicted
    _CACHE[key] = table
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table


def _build(
    lists: Sequence[Sequence[Tensor] | Sequence[int]],
    device: torch.device,
    vector_rows: int,
    capturing: bool,
) -> Table:
    numels = [t.numel() for t in lists[0]]
    geo = geometry(sum(numels))
    owner: list[int] = []
    starts: list[int] = []
    for i, n in enumerate(numels):
        for start in range(0, n, geo.chunk):
            owner.append(i)
            starts.append(start)
    addrs = [[t if isinstance(t, int) else t.data_ptr() for t in lst] for lst in lists]
    vector_lists = [
        row for lst, row in zip(lists[:vector_rows], addrs) if lst and not isinstance(lst[0], int)
    ]
    per_tensor = [int(all(row[i] % 16 == 0 for row in vector_lists)) for i in range(len(numels))]
    vector = (
        VECTOR_ALL
        if all(per_tensor)
        else VECTOR_PER_TENSOR
        if any(f and n for f, n in zip(per_tensor, numels))
        else VECTOR_NONE
    )
    flat = [*owner, *starts, *numels, *per_tensor]
    for row in addrs:
        flat.extend(row)
    host = None
    if capturing:
        # A blocking upload is not allowed while a CUDA graph captures (the tensors it
        # allocates get new addresses, hence a new table): an asynchronous copy from pinned
        # memory is, and the graph repeats it at each replay from the kept host copy.
        host = torch.tensor(flat, dtype=torch.int64).pin_memory()
        data = host.to(device, non_blocking=True)
    else:
        data = torch.tensor(flat, dtype=torch.int64).to(device)
    return Table(data, len(numels), len(owner), vector, geo.block, geo.chunk, host)


#: Per ``(device, stream)``: a zeroed int32 counter the multi-program kernels use to find
#: their last program (see :func:`last_program`). Allocated once, never freed (a captured
#: CUDA graph keeps reading its address).
_COUNTERS: dict[tuple[torch.device, int], Tensor] = {}


def _stream_id(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device.index if device.index is not None else torch.cuda.current_device()))
    return torch.cuda.current_stream(device).cuda_stream  # pragma: no cover - older torch


def counter(device: torch.device) -> Tensor:
    """The completion counter of launches on ``device``'s current stream.

    Zero between launches: the last program of a launch (the one whose increment brings it
    to the launch's program count) sets it back to zero itself, so a steady-state step
    allocates and fills nothing. One per stream, so that launches on two streams of a device
    never count each other's programs; under CUDA graph capture the capture stream gets its
    own (allocated during the capture: its memory stays with the tensor kept here).
    """
    key = (device, _stream_id(device))
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def locate(table, n_chunks):
    """``(tensor index, first element, elements left)`` of this program's chunk; an empty span
    of tensor 0 for a program past the last chunk."""
    pid = tl.program_id(0)
    live = pid < n_chunks
    t = tl.load(table + pid, mask=live, other=0)
    start = tl.load(table + n_chunks + pid, mask=live, other=0)
    left = tl.load(table + 2 * n_chunks + t) - start
    return t, start, tl.where(live, left, 0)


@triton.jit
def row_entry(table, n_tensors, n_chunks, t, row: tl.constexpr):
    """The raw int64 of tensor ``t`` in list ``row`` (rows after the numel and vector rows)."""
    return tl.load(table + 2 * n_chunks + (2 + row) * n_tensors + t)


@triton.jit
def vectorised(table, n_tensors, n_chunks, t):
    """Whether every vector-accessed address of tensor ``t`` is 16-byte aligned (its flag in
    the table's vector row)."""
    return tl.load(table + 2 * n_chunks + n_tensors + t) != 0


@triton.jit
def address(
    table, n_tensors, n_chunks, t, start, row: tl.constexpr, DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Typed pointer to element ``start`` of tensor ``t`` of pointer list ``row``.

    With ``ALIGNED`` the compiler is told the address is 16-byte aligned (``start`` is a
    multiple of the block size), which lets loads and stores vectorise.
    """
    addr = row_entry(table, n_tensors, n_chunks, t, row)
    ptr = addr.to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def chunk_span(table, n_chunks, chunk, numel_arg, DIRECT: tl.constexpr):
    """The opening of every kernel: ``(t, start, count)`` of this program's chunk.

    ``t`` is the tensor's index in the table (a table launch; unused by a ``DIRECT`` launch,
    which has one tensor of ``numel_arg`` elements), ``start`` the chunk's first element and
    ``count`` its number of elements (at most ``chunk``, as int32; 0 for a program past the
    last chunk).
    """
    if DIRECT:
        start = tl.program_id(0).to(tl.int64) * chunk
        t = start  # never used: a direct launch has one tensor
        count = numel_arg - start
    else:
        t, start, count = locate(table, n_chunks)
    return t, start, tl.minimum(count, chunk).to(tl.int32)


@triton.jit
def pointer(
    table, n_tensors, n_chunks, t, start, row: tl.constexpr, arg, DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    """Typed pointer to element ``start`` of this program's tensor of list ``row``: of the
    tensor argument ``arg`` in a ``DIRECT`` launch, else from the table (see :func:`address`)."""
    if DIRECT:
        ptr = arg + start
    else:
        ptr = address(table, n_tensors, n_chunks, t, start, row, DTYPE, ALIGNED)
    return ptr


@triton.jit
def entry(table, n_tensors, n_chunks, t, row: tl.constexpr):
    """The raw int64 of tensor ``t`` in list ``row`` (a list of values, not addresses)."""
    return row_entry(table, n_tensors, n_chunks, t, row)


@triton.jit
def last_program(counter, n_programs):
    """Whether this program is the last of its launch to get here (exactly one is).

    Every program increments the launch's completion counter once, after its own writes (a
    barrier first, so that every thread's writes precede the increment; the atomic has
    acquire-release semantics, so the last program sees all of them). The last one sets the
    counter back to zero for the next launch on the stream.
    """
    tl.debug_barrier()
    done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    last = done == n_programs - 1
    tl.store(counter, 0, mask=last)
    return last


@triton.jit
def total(parts, n, RBLOCK: tl.constexpr, VOLATILE: tl.constexpr):
    """The float64 sum of ``n`` values at ``parts``, in a fixed order (the same bits at every
    call for the same values): lane-wise over blocks of ``RBLOCK``, then across lanes."""
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for i in range(0, n, RBLOCK):
        offs = i + tl.arange(0, RBLOCK)
        acc += tl.load(parts + offs, mask=offs < n, other=0.0, volatile=VOLATILE).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def finite(x):
    """``x`` is neither infinite nor nan (a scalar)."""
    return tl.abs(x) < float("inf")  # false for +-inf and for nan


@triton.jit
def device_scalar(x, x_t, FROM_TENSOR: tl.constexpr):
    """A float64 hyperparameter: ``x``, times the value of the one-element tensor ``x_t`` when
    ``FROM_TENSOR`` (read on the device, so a new value needs neither a recompile nor, in a
    CUDA graph, a new capture)."""
    value = f64(x)
    if FROM_TENSOR:
        value = value * tl.load(x_t).to(tl.float64)
    return value


@triton.jit
def f64(x):
    """A runtime float argument as a float64 scalar.

    Compiled, the argument already is one (kernels annotate it ``tl.float64``); the
    interpreter passes the Python float through, and this keeps all of its 53 bits.
    """
    return tl.full([], x, tl.float64)


@triton.jit
def block_flag(flag, BLOCK: tl.constexpr):
    """A 0-d bool ``flag`` as a ``[BLOCK]`` mask.

    Written as a select of a constant block: the interpreter cannot broadcast a bool scalar
    into a block (as a store mask or an AND operand); compiled, it folds to a splat.
    """
    return tl.where(flag, tl.full([BLOCK], 0, tl.int32) == 0, False)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    r"""Round ``x`` (float32, or float64 for float64 storage) once to the storage type.

    bfloat16 is rounded to nearest-even by hand on the bit pattern,

    .. math:: \mathrm{bits}(y) = \big(u + \mathtt{0x7FFF} + ((u \gg 16) \,\&\, 1)\big) \gg 16,
        \qquad u = \mathrm{bits}(x),

    which is exact for every finite value and for infinities (NaN is written as a quiet NaN):
    the Triton interpreter truncates a plain float32 -> bfloat16 cast, and one code path for
    both keeps what CI checks identical to what runs on a GPU.
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        hi = tl.where(x != x, 0x7FC0, u >> 16)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
