// Host interface of the CUDA kernels: plain C++ and the CUDA runtime, no torch.
//
// sam_kernels.cu implements these launchers; csrc/cuda/sam_cuda.cpp (the torch-facing glue)
// builds the pointer tables and calls them. Keeping torch out of the .cu files lets them compile
// with nvcc alone, which is how CI checks them on machines without a CUDA build of torch.
#pragma once

#if defined(FUSED_SAM_CUDA_HOST_BUILD)
#include "cuda/host_runtime.h"  // the host build of the kernels: no CUDA toolkit needed
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_SAM_HD __host__ __device__
#else
#define FUSED_SAM_HD
#endif

namespace fused_sam::cuda_kernels {

// Storage dtype of the tensors of one launch (all lists but masks and step counters share it).
enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Elements per chunk: the unit of work of one block iteration. A multiple of every vector width.
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int kThreads = 512;
// Most blocks of one launch (so most partial sums of a norm or dot launch): a grid is the
// blocks that are resident at once (occupancy API, per kernel and dtype), at most this many.
constexpr int kMaxGrid = 1024;
// Most norm-partials tensors (sumsqs) one restore+step call may check.
constexpr int kMaxSumsqs = 8;

// The pointer table: one int64 array in device memory, built on the host and cached by the glue
// while no data_ptr changes. For n tensors and `lists` pointer lists it holds
//
//   [0, n)                  numel of tensor t
//   [n, 2n + 1)             first chunk of tensor t (prefix sum; entry n is the chunk total)
//   [2n + 1, 3n + 1)        1 when every pointer of tensor t is 16-byte aligned (vector path)
//   [3n + 1 + l n, ...)     address of tensor t in list l, for l in [0, lists) (or a per-tensor
//                           value, e.g. the salts of a random mask)
//
// Nothing in it is written by a kernel: a cached table may be shared by streams and graphs.
struct TableLayout {
  int64_t n;
  int lists;

  FUSED_SAM_HD int64_t numel_at() const { return 0; }
  FUSED_SAM_HD int64_t chunk_begin_at() const { return n; }
  FUSED_SAM_HD int64_t aligned_at() const { return 2 * n + 1; }
  FUSED_SAM_HD int64_t ptr_at(int list) const { return 3 * n + 1 + list * n; }
  FUSED_SAM_HD int64_t size() const { return ptr_at(lists); }
};

struct Table {
  int64_t* data;  // device memory, TableLayout::size() entries
  TableLayout layout;
  int64_t chunks;  // total chunks (the table's chunk_begin[n])
};

// Device scratch of one (device, stream), made once and kept by the glue: the ticket counter
// that tells a grid's last block it is last (the norm and dot finalize, Adam's step counters),
// and one partial sum per block. Zero when made; the last block of every launch that takes a
// ticket puts it back to zero, so no launch is needed to reset it and a graph replay finds it
// as eager launches left it. Kernels on one stream run one after another, so one counter per
// stream suffices; the glue gives every stream its own.
struct Workspace {
  unsigned int* ticket;  // one counter
  double* partials;      // kMaxGrid entries
};

// Whether a base step is skipped: found_inf (nullable, float32 device) is nonzero, or the total
// of some norm-partials tensor sumsq[i] (float64 device, len[i] entries) is not finite. Every
// block decides from these device values alone; block 0 writes the decision to *skipped
// (nullable, device bool).
struct SkipArgs {
  const float* found_inf;
  const double* sumsq[kMaxSumsqs];
  int64_t len[kMaxSumsqs];
  int count;
  bool* skipped;
};

// Pointer lists of each op, in table order.
namespace lists {
enum Norm : int { kNormGrad = 0, kNormParam = 1, kNormLists = 2 };
enum Perturb : int { kPW = 0, kPG = 1, kPB = 2, kPMask = 3, kPerturbLists = 4 };
enum Restore : int { kRW = 0, kRB = 1, kRestoreLists = 2 };
enum Sgd : int { kSW = 0, kSG = 1, kSB = 2, kSBuf = 3, kSgdLists = 4 };
enum Adam : int {
  kAW = 0, kAG = 1, kAB = 2, kAM = 3, kAV = 4, kAVmax = 5, kAStep = 6, kAdamLists = 7
};
enum Dot : int { kDotA = 0, kDotB = 1, kDotLists = 2 };
enum Axpby : int { kXOut = 0, kXX = 1, kXY = 2, kAxpbyLists = 3 };
}  // namespace lists

struct SgdArgs {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first_step, with_momentum;
  const double* lr_device;  // nullable, device: when set, read instead of lr (CUDA graphs)
  const float* grad_scale;  // nullable, device
  SkipArgs skip;
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  // Step counters: on the device (float32 pointers in list kAStep, read and advanced in the
  // kernel) or on the host, in which case the bias corrections come as these two scalars.
  bool device_steps;
  double step_size, bias_c2_sqrt;
  const double* lr_device;  // nullable, device: read instead of lr (device_steps only)
  const float* grad_scale;  // nullable, device
  SkipArgs skip;
};

// Launchers size their grid from the occupancy of their kernel (blocks resident at once on the
// current device, at most kMaxGrid and at most one per chunk) and enqueue one launch on stream.

// Writes out[0] = the sum of (T(w) g)^2 (squares and sums in float64): each block writes its
// partial to ws, and the last block to finish adds them in block order (deterministic).
cudaError_t launch_norm_sq(DType dtype, const Table& table, bool adaptive, double eta,
                           const Workspace& ws, double* out, cudaStream_t stream);

// What list kPMask of a perturb table holds: nothing, mask addresses (bit-packed masks), or
// per-tensor 32-bit salts of a random mask (keep element j of tensor t iff
// element_hash(salt_t ^ step_key, j) < threshold; see fused_sam.masks).
enum class MaskKind : int { kNone = 0, kBits = 1, kRandom = 2 };

struct RandomMask {
  uint32_t step_key;
  uint32_t threshold;
};

// Adds the sumsq_len entries of sumsq (float, or double when sumsq_double; a short tensor: the
// output of launch_norm_sq, or a few of them) in index order in every thread, then backup = w
// and w += e where the norm is finite. rho_device (nullable, device) replaces rho when set.
cudaError_t launch_perturb(DType dtype, const Table& table, MaskKind mask, RandomMask random,
                           const void* sumsq, bool sumsq_double, int64_t sumsq_len, double rho,
                           const double* rho_device, double eps, bool adaptive, double eta,
                           cudaStream_t stream);

cudaError_t launch_restore(DType dtype, const Table& table, cudaStream_t stream);

// Restore, then the step unless args.skip says skipped. Launches even for an empty table (the
// skip flag is written by the kernel).
cudaError_t launch_restore_sgd_step(DType dtype, const Table& table, const SgdArgs& args,
                                    cudaStream_t stream);

// As launch_restore_sgd_step; with device step counters, the grid's last block advances them
// (ticket in ws) unless skipped.
cudaError_t launch_restore_adam_step(DType dtype, const Table& table, const AdamArgs& args,
                                     const Workspace& ws, cudaStream_t stream);

// Writes out[0] = the sum of a b (products and sums in float64), finalized like launch_norm_sq.
cudaError_t launch_dot(DType dtype, const Table& table, const Workspace& ws, double* out,
                       cudaStream_t stream);

// out = c[0] x + c[stride] y in float64, converted to the storage type, with the coefficients
// read on the device (c: float64, device memory); nothing is written where *skip (nullable,
// device) is nonzero.
cudaError_t launch_axpby(DType dtype, const Table& table, const double* coefs, int64_t coefs_stride,
                         const float* skip, cudaStream_t stream);

}  // namespace fused_sam::cuda_kernels
