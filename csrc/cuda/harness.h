// The indexing of the fused_sam CUDA kernels, compiled for the device and for the host.
//
// The pointer table's host image (fill_table: what the glue uploads), the grid the glue picks
// (launch_grid), the walk of a block over its chunks and of a thread over its packs (with the
// block and thread indices as arguments), and the reduction tree of block_sum: the CUDA kernels
// (multi_tensor.cuh passes blockIdx/threadIdx) and their host build (host_driver.cc, which loops
// over every block and thread of the same grid) run this same source. Nothing here includes a
// CUDA or torch header when compiled by a host compiler.
#pragma once

#include <cstdint>

#include "cuda/sam_kernels.h"

#if defined(__CUDACC__)
#define FUSED_SAM_UNROLL _Pragma("unroll")
#else
#define FUSED_SAM_UNROLL
#endif

namespace fused_sam::cuda_kernels {

// ---------------------------------------------------------------------------------------------
// 16-byte packs: 4 float, 8 half/bfloat16, 2 double per vector access

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// ---------------------------------------------------------------------------------------------
// Building a table and choosing a grid (host side of the glue)

FUSED_SAM_HD inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// One entry of a pointer list: an address (or a per-tensor value), and whether it must be
// 16-byte aligned for its tensor to take the vector path.
struct TableEntry {
  int64_t value;
  bool vectorised;
};

// Writes the table image (layout.size() entries) for tensors of
// numel(t) elements whose list-l entry is entry(l, t); returns the chunk total. A tensor takes
// the 16-byte path when every vectorised entry of it is 16-byte aligned; the others (masks, step
// counters, values) do not take part.
template <typename Numel, typename Entry>
int64_t fill_table(const TableLayout& layout, Numel&& numel, Entry&& entry, int64_t* host) {
  int64_t chunk = 0;
  for (int64_t t = 0; t < layout.n; ++t) {
    const int64_t size = numel(t);
    host[layout.numel_at() + t] = size;
    host[layout.chunk_begin_at() + t] = chunk;
    chunk += chunks_of(size);
    bool aligned = true;
    for (int l = 0; l < layout.lists; ++l) {
      const TableEntry e = entry(l, t);
      host[layout.ptr_at(l) + t] = e.value;
      aligned = aligned && (!e.vectorised || e.value % 16 == 0);
    }
    host[layout.aligned_at() + t] = aligned ? 1 : 0;
  }
  host[layout.chunk_begin_at() + layout.n] = chunk;
  return chunk;
}

// The grid of a launch over `chunks` chunks: one block per chunk, at most `max_blocks` (the
// blocks resident on the device at once) and `cap` (e.g. the number of norm partials).
FUSED_SAM_HD inline int launch_grid(int64_t chunks, int64_t max_blocks, int64_t cap) {
  int64_t grid = chunks < max_blocks ? chunks : max_blocks;
  grid = grid < cap ? grid : cap;
  return static_cast<int>(grid > 1 ? grid : 1);
}

// ---------------------------------------------------------------------------------------------
// Table access and the chunk walk

struct TableView {
  const int64_t* data;
  TableLayout layout;

  FUSED_SAM_HD int64_t numel(int64_t t) const { return data[t]; }
  FUSED_SAM_HD bool aligned(int64_t t) const { return data[layout.aligned_at() + t] != 0; }
  template <typename P>
  FUSED_SAM_HD P* ptr(int list, int64_t t) const {
    return reinterpret_cast<P*>(data[layout.ptr_at(list) + t]);
  }
  // Entry t of a list that holds values instead of addresses.
  FUSED_SAM_HD int64_t value(int list, int64_t t) const { return data[layout.ptr_at(list) + t]; }
  // The tensor that owns chunk c: the last t with chunk_begin[t] <= c (empty tensors own none).
  FUSED_SAM_HD int64_t tensor_of(int64_t c) const {
    const int64_t* begin = data + layout.chunk_begin_at();
    int64_t lo = 0, hi = layout.n;  // invariant: begin[lo] <= c < begin[hi]
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (begin[mid] <= c) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    return lo;
  }
  FUSED_SAM_HD int64_t chunk_begin(int64_t t) const {
    return data[layout.chunk_begin_at() + t];
  }
};

struct ChunkRef {
  int64_t tensor;
  int64_t begin;  // first element of the chunk in its tensor
  int64_t end;    // one past the last
  bool vec;       // the tensor's pointers allow 16-byte accesses
};

// Calls body(chunk) for every chunk block `block` of `grid` owns (grid stride over the chunks).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Body>
FUSED_SAM_HD void walk_chunks(const TableView& tab, int64_t chunks, int64_t block, int64_t grid,
                              Body&& body) {
  for (int64_t c = block; c < chunks; c += grid) {
    const int64_t t = tab.tensor_of(c);
    const int64_t begin = (c - tab.chunk_begin(t)) * kChunk;
    const int64_t end = begin + kChunk < tab.numel(t) ? begin + kChunk : tab.numel(t);
    body(ChunkRef{t, begin, end, tab.aligned(t)});
  }
}

// Calls step(i, n) for the packs of a chunk owned by thread `thread` of `threads`: i is the first
// element of a pack, n <= V the number of valid lanes (less only for the tensor's last pack).
// Off the vector path every pack is one element.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <int V, typename Step>
FUSED_SAM_HD void walk_packs(const ChunkRef& c, int64_t thread, int64_t threads, Step&& step) {
  if (c.vec) {
    for (int64_t i = c.begin + thread * V; i < c.end; i += threads * V) {
      const int64_t left = c.end - i;
      step(i, left < V ? static_cast<int>(left) : V);
    }
  } else {
    for (int64_t i = c.begin + thread; i < c.end; i += threads) {
      step(i, 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The reduction tree of a warp: lane i adds lane i + off for off = 16, 8, 4, 2, 1 (a lane whose
// partner is past lane 31 adds its own value: __shfl_down_sync's rule; lane 0 never reads one).
// Generic over the value: the device passes one lane's double and a shuffle, the host all 32
// lanes at once (HostLanes) and a shift, so that both add the same pairs in the same order.

constexpr int kWarp = 32;

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename X, typename Down>
FUSED_SAM_HD X warp_tree(X x, Down&& down) {
  FUSED_SAM_UNROLL
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    x = x + down(x, off);
  }
  return x;
}

}  // namespace fused_sam::cuda_kernels
