// Multi-tensor harness for the fused_sam CUDA kernels (raw pointers only, no torch).
//
// A launch covers every tensor of a call. The pointer table (sam_kernels.h) cuts each tensor
// into chunks of kChunk elements; blocks walk the chunk list with a grid stride, find the
// tensor of a chunk by binary search over the chunk prefix sums, and process it with 16-byte
// vector loads (4 float, 8 half/bfloat16, 2 double per load) where the tensor's pointers are
// aligned, and scalar accesses for its last partial vector or when they are not. All indices are
// int64, so tensors over 2^31 elements work.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/element_math.h"
#include "cuda/harness.h"
#include "cuda/sam_kernels.h"

namespace fused_sam::cuda_kernels {

// ---------------------------------------------------------------------------------------------
// 16-byte packs

static_assert(sizeof(Pack<float>) == sizeof(uint4) && sizeof(Pack<double>) == sizeof(uint4),
              "a pack is one 16-byte vector");

// The 16-byte vector type the cache-hinted intrinsics take for a pack of T: the one of T's own
// kind where there is one (so that the scalar tail lanes beside it stay T-typed accesses).
template <typename T>
struct VecOf {
  using type = uint4;
};
template <>
struct VecOf<float> {
  using type = float4;
};
template <>
struct VecOf<double> {
  using type = double2;
};

// Loads lanes [0, n) of the pack at p + i; a full pack on the vector path is one 16-byte load.
// Lanes past n are zero so that reductions may include them.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, int64_t i, int n, bool vec) {
  Pack<T> out;
  if (vec && n == Pack<T>::kSize) {
    // One ld.global.cs.v4 (SASS LDG.E.EF.128): the global-space intrinsic, where a plain
    // dereference of a pointer read from the table is a generic LD.E.128; streaming (evict
    // first), as every element is read once per launch.
    using V = typename VecOf<T>::type;
    union {
      V bits;
      Pack<T> pack;
    } in{__ldcs(reinterpret_cast<const V*>(p + i))};
    out = in.pack;
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T>::kSize; ++j) {
      out.v[j] = j < n ? p[i + j] : Num<T>::from_op(0);
    }
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T>& x, int n, bool vec) {
  if (vec && n == Pack<T>::kSize) {
    // One st.global.cs.v4 (SASS STG.E.EF.128) through the store intrinsic: a plain assignment
    // of a Pack<T> (or of its bits) is split into scalar stores by nvcc when it can see the
    // lanes; streaming, as for the loads.
    using V = typename VecOf<T>::type;
    union {
      Pack<T> pack;
      V bits;
    } out{x};
    __stcs(reinterpret_cast<V*>(p + i), out.bits);
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T>::kSize; ++j) {
      if (j < n) {
        p[i + j] = x.v[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The chunk walk of this block and thread (harness.h, shared with the host build)

// Calls body(chunk) for every chunk this block owns (grid-stride over the chunk list).
template <typename Body>
__device__ __forceinline__ void for_each_chunk(const TableView& tab, int64_t chunks, Body&& body) {
  walk_chunks(tab, chunks, blockIdx.x, gridDim.x, body);
}

// Calls step(i, n) for the packs of a chunk owned by this thread (see walk_packs).
template <typename T, typename Step>
__device__ __forceinline__ void for_each_pack(const ChunkRef& c, Step&& step) {
  walk_packs<Pack<T>::kSize>(c, threadIdx.x, blockDim.x, step);
}

// ---------------------------------------------------------------------------------------------
// Deterministic block reduction (fixed shuffle tree, then warp 0 over the warp sums).

__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const auto down = [](double v, int off) { return __shfl_down_sync(0xffffffffu, v, off); };
  x = warp_tree(x, down);  // the tree the host build evaluates (harness.h)
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) {
    warp_sums[warp] = x;
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  x = threadIdx.x < warps ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0) {
    x = warp_tree(x, down);
  }
  return x;  // valid in thread 0
}

// ---------------------------------------------------------------------------------------------
// The grid's last block: every block calls this once, with the same ticket counter (zero
// before the launch). Returns true in every thread of the block that finished last, after every
// other block's writes before its call (and its __threadfence) are visible. That block puts the
// counter back to zero, so the next launch on the stream (or a graph replay) starts from zero
// without a reset launch.
__device__ __forceinline__ bool last_block(unsigned int* ticket) {
  __shared__ bool last;
  __syncthreads();  // this block's writes are done
  if (threadIdx.x == 0) {
    __threadfence();  // ... and visible to the grid before the ticket is taken
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (last) {
      atomicExch(ticket, 0u);  // every block has taken its ticket
      __threadfence();
    }
  }
  __syncthreads();
  return last;
}

// Sum of one double per block, in block order (deterministic for a given grid): every block
// passes its value (in thread 0, as block_sum leaves it); the last block adds the values of all
// blocks and thread 0 writes the total to *out. partials: gridDim.x entries of scratch.
__device__ __forceinline__ void grid_sum(double block_total, unsigned int* ticket,
                                         double* partials, double* out) {
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_total;
  }
  if (!last_block(ticket)) {
    return;
  }
  double x = 0.0;
  for (unsigned int k = threadIdx.x; k < gridDim.x; k += blockDim.x) {
    x += __ldcg(partials + k);  // from L2: another SM wrote it
  }
  x = block_sum(x);
  if (threadIdx.x == 0) {
    *out = x;
  }
}

}  // namespace fused_sam::cuda_kernels
