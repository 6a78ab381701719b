// Torch-facing glue of the CUDA kernels: argument checks, pointer tables, launches.
//
// Compiled only into a CUDA build (FUSED_SAM_WITH_CUDA); the kernels themselves are in
// sam_kernels.cu and know nothing of torch. A pointer table is built on the host for each call,
// compared with the tables already on the device, and uploaded only when it is new (some
// data_ptr changed, e.g. grads reallocated after zero_grad(set_to_none=True)); a steady training
// loop therefore makes no host-to-device copy, and a new table is an asynchronous copy from
// pinned memory (no stream drain). Scalars that change every step (the norm, the loss scale,
// found_inf, device step counters, the skip decision) are read and written by the kernels in
// device memory: no op reads a device value on the host, except Adam with step counters on the
// host (torch.optim.Adam's default), which must decide there whether to advance them.
//
// CUDA graphs: nothing here blocks or reads the device while a stream captures, tables used by a
// capture are kept for good (a replay reads them, and re-runs their upload from pinned memory
// that is kept too), and each stream has its own Workspace (ticket counter and scratch), made
// outside the capture's stream order and reset by the kernels themselves.
#ifdef FUSED_SAM_WITH_CUDA

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/element_math.h"
#include "cuda/harness.h"
#include "cuda/sam_kernels.h"
#include "op_checks.h"
#include "sam_ops.h"

namespace fused_sam::cuda {
namespace {

namespace ck = cuda_kernels;
using namespace ck::lists;

ck::DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return ck::DType::kFloat;
    case at::kDouble:
      return ck::DType::kDouble;
    case at::kHalf:
      return ck::DType::kHalf;
    case at::kBFloat16:
      return ck::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fused_sam: unsupported dtype ", s,
                  " (float32, float64, float16 and bfloat16 are)");
  }
}

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fused_sam: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The id of the capture sequence stream s is in (unique in the process), 0 when it captures none.
unsigned long long capture_id(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  check(cudaStreamGetCaptureInfo(s, &status, &id));
  return status == cudaStreamCaptureStatusNone ? 0 : id;
}

bool capturing(cudaStream_t s) { return capture_id(s) != 0; }

// Lets this thread make allocations while a stream captures (cudaMalloc, pinned host memory):
// torch.cuda.graph's default ("global") mode refuses them as potentially unsafe, but these are
// one-time allocations outside the captured work.
class RelaxedCapture {
 public:
  RelaxedCapture() { check(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// ---------------------------------------------------------------------------------------------
// Per-stream workspaces (sam_kernels.h): the ticket counter of the last-block finalize and the
// norm/dot partials. Made zero once per (device, stream), and once per capture sequence, and
// never freed (a graph keeps the address it captured); the kernels leave the counter at zero.
// No two streams and no two graphs share one, so launches that may run at once (eager work on
// two streams, two graphs replayed on two streams, a graph beside eager work) cannot mix their
// tickets.

ck::Workspace workspace(int device, cudaStream_t s) {
  static std::mutex mu;
  static std::map<std::tuple<int, cudaStream_t, unsigned long long>, ck::Workspace> made;
  const auto key = std::make_tuple(device, s, capture_id(s));
  std::lock_guard<std::mutex> lock(mu);
  auto it = made.find(key);
  if (it != made.end()) {
    return it->second;
  }
  constexpr size_t kTicketBytes = 256;  // keeps the partials 256-byte aligned
  constexpr size_t kBytes = kTicketBytes + sizeof(double) * ck::kMaxGrid;
  void* mem = nullptr;
  {
    const RelaxedCapture relaxed;
    check(cudaMalloc(&mem, kBytes));
    // Zeroed on a private stream and waited for here, once: outside any capture's stream
    // order (a memset captured into a graph would not zero it for eager launches), and done
    // before any launch can use it.
    cudaStream_t side = nullptr;
    check(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    const cudaError_t set = cudaMemsetAsync(mem, 0, kBytes, side);
    const cudaError_t wait = cudaStreamSynchronize(side);
    cudaStreamDestroy(side);
    check(set);
    check(wait);
  }
  auto* base = static_cast<char*>(mem);
  const ck::Workspace ws{reinterpret_cast<unsigned int*>(base),
                         reinterpret_cast<double*>(base + kTicketBytes)};
  made.emplace(key, ws);
  return ws;
}

// ---------------------------------------------------------------------------------------------
// One-element tensor arguments (grad_scale, found_inf) as float32 device pointers. The tensor
// list checks are shared with the CPU ops (op_checks.h).

const float* device_scalar(const std::optional<at::Tensor>& t, const at::Tensor& like,
                           std::vector<at::Tensor>& keep, const char* what) {
  if (!t.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(t->numel() == 1, "fused_sam: ", what, " must have one element");
  at::Tensor v = t->to(like.device(), at::kFloat).contiguous();
  keep.push_back(v);  // alive until the launch is enqueued (the allocator is stream-ordered)
  return v.data_ptr<float>();
}

// The skip inputs of a restore+step launch: found_inf and the norm partials to check, as device
// pointers, and the op's 0-dim bool output (`flag`), which the kernel writes.
ck::SkipArgs skip_args(const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs,
                       const at::Tensor& like, std::vector<at::Tensor>& keep, at::Tensor& flag) {
  TORCH_CHECK(static_cast<int64_t>(sumsqs.size()) <= ck::kMaxSumsqs, "fused_sam: sumsqs has ",
              sumsqs.size(), " tensors; at most ", ck::kMaxSumsqs,
              " are supported (concatenate the partials of one pass)");
  ck::SkipArgs args{};
  args.found_inf = device_scalar(found_inf, like, keep, "found_inf");
  for (size_t i = 0; i < sumsqs.size(); ++i) {
    const at::Tensor& s = sumsqs[i];
    TORCH_CHECK(s.device() == like.device() && s.dim() == 1 && s.scalar_type() == at::kDouble,
                "fused_sam: sumsqs[", i, "] must be a 1-D float64 tensor on ", like.device(),
                " (the output of norm_sq_partials)");
    const at::Tensor c = s.contiguous();
    keep.push_back(c);
    args.sumsq[i] = c.const_data_ptr<double>();
    args.len[i] = c.numel();
  }
  args.count = static_cast<int>(sumsqs.size());
  flag = at::empty({}, like.options().dtype(at::kBool));
  args.skipped = flag.data_ptr<bool>();
  return args;
}

// ---------------------------------------------------------------------------------------------
// Pointer tables

class TableCache {
 public:
  // The device copy of `host` (layout `layout`), uploading it only when no cached table matches.
  // `keep` receives the table's storage, so that an eviction by another thread cannot free it
  // before the launch is enqueued. An upload is an asynchronous copy from pinned memory on
  // stream `s`; while `s` captures a graph, the table (found or made) is kept for good.
  ck::Table get(std::vector<int64_t> host, const ck::TableLayout& layout, at::Device device,
                cudaStream_t s, at::Tensor& keep) {
    const uint64_t key = hash(host, device);
    const bool in_capture = capturing(s);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key && it->device == device && it->host == host) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return use(entries_.front(), s, in_capture, keep);
      }
    }
    Entry e{key, device, std::move(host), {}, {}, layout, s, false};
    const int64_t size = static_cast<int64_t>(e.host.size());
    {
      // Pinned host memory may be a new cudaHostAlloc, which a capture refuses in its default
      // mode; the copy itself is enqueued (and captured) normally below.
      std::optional<RelaxedCapture> relaxed;
      if (in_capture) {
        relaxed.emplace();
      }
      e.pinned = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    }
    std::memcpy(e.pinned.data_ptr<int64_t>(), e.host.data(), size * sizeof(int64_t));
    e.data = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
    // Asynchronous: the host allocator records the copy on the stream, so the pinned block is
    // not reused before the copy has run even if this entry is evicted first.
    e.data.copy_(e.pinned, /*non_blocking=*/true);
    entries_.push_front(std::move(e));
    evict();
    return use(entries_.front(), s, in_capture, keep);
  }

 private:
  struct Entry {
    uint64_t key;
    at::Device device;
    std::vector<int64_t> host;
    at::Tensor pinned;  // the upload's source; a captured upload re-reads it at every replay
    at::Tensor data;
    ck::TableLayout layout;
    cudaStream_t made_on;  // the stream its device memory was allocated on
    bool captured;         // used by a graph capture: kept for good
  };

  static constexpr size_t kMaxEntries = 64;

  static uint64_t hash(const std::vector<int64_t>& v, at::Device device) {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(device.index());
    for (const int64_t x : v) {
      h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    }
    return h;
  }

  static ck::Table use(Entry& e, cudaStream_t s, bool in_capture, at::Tensor& keep) {
    // A graph reads the table at every replay: it must outlive the graph, so it is never
    // evicted (as the Triton backend keeps its captured tables).
    e.captured = e.captured || in_capture;
    if (s != e.made_on) {
      // Used on another stream: the allocator must not reuse the memory after an eviction
      // before that stream's launches have read it.
      // (s is the current stream: every caller launches on it.)
      c10::cuda::CUDACachingAllocator::recordStream(
          e.data.storage().data_ptr(), c10::cuda::getCurrentCUDAStream(e.device.index()));
    }
    keep = e.data;
    return ck::Table{e.data.data_ptr<int64_t>(), e.layout,
                     e.host[e.layout.chunk_begin_at() + e.layout.n]};
  }

  // Drops the least recently used tables that no graph uses while more than kMaxEntries are
  // cached.
  void evict() {
    size_t count = entries_.size();
    auto it = entries_.end();
    // Oldest first; never the front, the table just made or found.
    while (count > kMaxEntries && --it != entries_.begin()) {
      if (!it->captured) {
        it = entries_.erase(it);
        --count;
      }
    }
  }

  std::mutex mu_;
  std::list<Entry> entries_;
};

TableCache& cache() {
  static TableCache c;
  return c;
}

// One list of the table: its tensors (empty = null pointers) and whether it takes part in the
// 16-byte alignment decision (the lists in the storage dtype do; masks and counters do not);
// or, with no tensors, per-tensor values stored as they are (a random mask's salts).
struct ListSpec {
  at::TensorList tensors;
  bool vectorised;
  c10::IntArrayRef values = {};
};

// A table ready to launch with, and the storage that keeps it alive meanwhile.
struct LaunchTable : ck::Table {
  at::Tensor keep;
};

LaunchTable make_table(at::TensorList params, std::initializer_list<ListSpec> specs) {
  const int64_t n = static_cast<int64_t>(params.size());
  const ck::TableLayout layout{n, static_cast<int>(specs.size())};
  std::vector<int64_t> host(layout.size(), 0);
  // The same image the host build of the kernels builds (harness.h).
  ck::fill_table(
      layout, [&](int64_t t) { return params[t].numel(); },
      [&](int l, int64_t t) {
        const ListSpec& s = specs.begin()[l];
        if (!s.tensors.empty()) {
          return ck::TableEntry{reinterpret_cast<int64_t>(s.tensors[t].data_ptr()), s.vectorised};
        }
        return ck::TableEntry{s.values.empty() ? 0 : s.values[t], false};
      },
      host.data());
  LaunchTable out;
  static_cast<ck::Table&>(out) =
      cache().get(std::move(host), layout, params[0].device(), stream(), out.keep);
  return out;
}

void launch_restore(at::TensorList params, at::TensorList backups) {
  const LaunchTable t = make_table(params, {{params, true}, {backups, true}});
  if (t.chunks > 0) {
    check(ck::launch_restore(kernel_dtype(params[0].scalar_type()), t, stream()));
  }
}

// A one-element hyperparameter tensor (lr, rho) as a float64 device pointer that the kernel
// reads when it runs (so a graph replay reads the value of the moment); nullptr for none.
const double* device_hyper(const std::optional<at::Tensor>& t, const at::Tensor& like,
                           std::vector<at::Tensor>& keep, const char* what) {
  if (!t.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(t->numel() == 1 && t->is_floating_point() && t->device() == like.device(),
              "fused_sam: ", what, " as a tensor must be a one-element float tensor on ",
              like.device());
  // float64 as given is read in place; another dtype is converted by a (captured) copy.
  at::Tensor v = t->to(at::kDouble).contiguous();
  keep.push_back(v);
  return v.const_data_ptr<double>();
}

void perturb_impl(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  const at::Tensor& sumsq, double rho, const std::optional<at::Tensor>& rho_t,
                  double eps, bool adaptive, double eta, at::TensorList masks,
                  c10::IntArrayRef salts, int64_t step_key, int64_t threshold) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  check_masks(masks, params);
  check_random(salts, step_key, threshold, masks, params);
  TORCH_CHECK(sumsq.device() == params[0].device() && sumsq.dim() == 1 &&
                  (sumsq.scalar_type() == at::kFloat || sumsq.scalar_type() == at::kDouble),
              "fused_sam: sumsq must be a 1-D float32/float64 tensor on ", params[0].device());
  bump_versions({params, backups});
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  const double* rho_device = device_hyper(rho_t, params[0], keep, "rho");
  const at::Tensor s = sumsq.contiguous();
  // The salts are fixed per parameter, so a random mask keeps the table cached; the step key
  // changes every step and goes to the kernel as an argument.
  const LaunchTable t = make_table(
      params, {{params, true}, {grads, true}, {backups, true}, {masks, false, salts}});
  if (t.chunks == 0) {
    return;
  }
  const ck::MaskKind kind = !masks.empty()   ? ck::MaskKind::kBits
                            : !salts.empty() ? ck::MaskKind::kRandom
                                             : ck::MaskKind::kNone;
  const ck::RandomMask random{static_cast<uint32_t>(step_key), static_cast<uint32_t>(threshold)};
  check(ck::launch_perturb(kernel_dtype(params[0].scalar_type()), t, kind, random, s.data_ptr(),
                           s.scalar_type() == at::kDouble, s.numel(), rho, rho_device, eps,
                           adaptive, eta, stream()));
}

at::Tensor restore_sgd_step_impl(at::TensorList params, at::TensorList grads,
                                 at::TensorList backups, at::TensorList momentum_buffers,
                                 double lr, const std::optional<at::Tensor>& lr_t,
                                 double weight_decay, double momentum, double dampening,
                                 bool nesterov, bool maximize, bool first_step,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 at::TensorList sumsqs) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  const bool with_momentum = momentum != 0.0;
  if (with_momentum) {
    check_list(momentum_buffers, params, "momentum_buffers");
  }
  bump_versions({params, with_momentum ? momentum_buffers : at::TensorList()});
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  at::Tensor flag;
  const ck::SgdArgs args{lr,
                         weight_decay,
                         momentum,
                         dampening,
                         nesterov,
                         maximize,
                         first_step,
                         with_momentum,
                         device_hyper(lr_t, params[0], keep, "lr"),
                         device_scalar(grad_scale, params[0], keep, "grad_scale"),
                         skip_args(found_inf, sumsqs, params[0], keep, flag)};
  const LaunchTable t = make_table(
      params, {{params, true},
               {grads, true},
               {backups, true},
               {with_momentum ? momentum_buffers : at::TensorList(), true}});
  // Launched even when every tensor is empty: the kernel writes the skip flag.
  check(ck::launch_restore_sgd_step(kernel_dtype(params[0].scalar_type()), t, args, stream()));
  return flag;
}

// Whether a step with step counters on the host is skipped, decided on the host (one read of
// found_inf and of each sumsq total: the counters' advance depends on it).
bool skipped_on_host(const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    return true;
  }
  for (const at::Tensor& s : sumsqs) {
    if (!std::isfinite(s.to(at::kDouble).sum().item<double>())) {
      return true;
    }
  }
  return false;
}

at::Tensor restore_adam_step_impl(at::TensorList params, at::TensorList grads,
                                  at::TensorList backups, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  at::TensorList state_steps, double lr,
                                  const std::optional<at::Tensor>& lr_t, double beta1,
                                  double beta2, double eps, double weight_decay, bool amsgrad,
                                  bool maximize, bool decoupled_weight_decay,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf,
                                  at::TensorList sumsqs) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) {
    check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  }
  TORCH_CHECK(state_steps.size() == params.size(), "fused_sam: one step counter per parameter");
  const bool device_steps = state_steps[0].is_cuda();
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1 && s.is_contiguous(),
                "fused_sam: state_steps[", i, "] must be a one-element tensor");
    if (device_steps) {
      TORCH_CHECK(s.device() == params[0].device() && s.scalar_type() == at::kFloat,
                  "fused_sam: state_steps[", i, "] must be float32 on ", params[0].device(),
                  " like the others (or all of them on the cpu)");
    } else {
      TORCH_CHECK(s.device().is_cpu(), "fused_sam: state_steps[", i,
                  "] must be on the cpu like state_steps[0] (or all on ", params[0].device(), ")");
    }
  }
  bump_versions({params, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                 state_steps});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t s = stream();
  TORCH_CHECK(device_steps || !capturing(s),
              "fused_sam: Adam/AdamW step counters on the cpu are read and advanced on the host, "
              "which a CUDA graph would freeze; capture with capturable=True (counters on the "
              "GPU)");
  std::vector<at::Tensor> keep;
  at::Tensor flag;
  std::optional<at::Tensor> lr_device = lr_t;
  if (lr_t.has_value() && !device_steps) {
    // The host computes the bias-corrected step size of host counters, so it needs lr there.
    lr = lr_t->item<double>();
    lr_device.reset();
  }
  ck::AdamArgs args{lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    amsgrad,
                    maximize,
                    decoupled_weight_decay,
                    device_steps,
                    0.0,
                    0.0,
                    device_hyper(lr_device, params[0], keep, "lr"),
                    device_scalar(grad_scale, params[0], keep, "grad_scale"),
                    {}};
  const ck::DType dtype = kernel_dtype(params[0].scalar_type());
  const ck::Workspace ws = workspace(params[0].get_device(), s);
  const auto launch = [&](at::TensorList p, at::TensorList g, at::TensorList b, at::TensorList m,
                          at::TensorList v, at::TensorList vmax, at::TensorList steps) {
    const LaunchTable t = make_table(p, {{p, true},
                                         {g, true},
                                         {b, true},
                                         {m, true},
                                         {v, true},
                                         {amsgrad ? vmax : at::TensorList(), true},
                                         {steps, false}});
    // Launched even when every tensor is empty: the kernel writes the skip flag.
    check(ck::launch_restore_adam_step(dtype, t, args, ws, s));
  };
  if (device_steps) {
    // The skip decision, the flag and the counters' advance are the kernel's: no host read.
    args.skip = skip_args(found_inf, sumsqs, params[0], keep, flag);
    launch(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps);
    return flag;
  }
  // Counters on the host (torch.optim.Adam's default): whether to advance them depends on
  // found_inf and the norms, which costs one synchronisation when given. Keep them on the
  // device (capturable=True) to avoid it.
  flag = at::empty({}, params[0].options().dtype(at::kBool));
  if (skipped_on_host(found_inf, sumsqs)) {
    launch_restore(params, backups);
    flag.fill_(true);
    return flag;
  }
  args.skip.skipped = flag.data_ptr<bool>();  // each launch below writes false
  // Tensors that share a step count share the bias corrections: one launch per distinct count
  // (a single one unless some parameters missed steps).
  std::map<double, std::vector<size_t>> by_step;
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& st = state_steps[i];
    double step;
    if (st.scalar_type() == at::kFloat) {
      float* p = st.data_ptr<float>();
      *p += 1.0f;
      step = *p;
    } else {
      TORCH_CHECK(st.scalar_type() == at::kDouble, "fused_sam: state_steps must be floating");
      double* p = st.data_ptr<double>();
      *p += 1.0;
      step = *p;
    }
    by_step[step].push_back(i);
  }
  for (const auto& [step, idx] : by_step) {
    const ck::AdamBias bias = ck::adam_bias(lr, beta1, beta2, step);  // element_math.h
    args.step_size = bias.step_size;
    args.bias_c2_sqrt = bias.bias_c2_sqrt;
    if (idx.size() == params.size()) {
      launch(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, {});
      continue;
    }
    const auto pick = [&](at::TensorList ts) {
      std::vector<at::Tensor> out;
      if (!ts.empty()) {
        for (const size_t i : idx) {
          out.push_back(ts[i]);
        }
      }
      return out;
    };
    const auto p = pick(params), g = pick(grads), b = pick(backups), m = pick(exp_avgs),
               v = pick(exp_avg_sqs), x = pick(max_exp_avg_sqs);
    launch(p, g, b, m, v, x, {});
  }
  return flag;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive,
                            double eta) {
  check_params(grads);
  check_list(params, grads, "params");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const LaunchTable t = make_table(grads, {{grads, true}, {params, adaptive}});
  // One entry, the total, written by the grid's last block (also for an all-empty list: one
  // block adds nothing).
  at::Tensor out = at::empty({kCudaNormPartials}, grads[0].options().dtype(at::kDouble));
  check(ck::launch_norm_sq(kernel_dtype(grads[0].scalar_type()), t, adaptive, eta,
                           workspace(grads[0].get_device(), stream()), out.data_ptr<double>(),
                           stream()));
  return out;
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks, c10::IntArrayRef salts, int64_t step_key,
              int64_t threshold) {
  perturb_impl(params, grads, backups, sumsq, rho, std::nullopt, eps, adaptive, eta, masks, salts,
               step_key, threshold);
}

void restore_(at::TensorList params, at::TensorList backups) {
  check_params(params);
  check_list(backups, params, "backups");
  bump_versions({params});
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_restore(params, backups);
}

at::Tensor restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                             at::TensorList momentum_buffers, double lr, double weight_decay,
                             double momentum, double dampening, bool nesterov, bool maximize,
                             bool first_step, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  return restore_sgd_step_impl(params, grads, backups, momentum_buffers, lr, std::nullopt,
                               weight_decay, momentum, dampening, nesterov, maximize, first_step,
                               grad_scale, found_inf, sumsqs);
}

at::Tensor restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                              double lr, double beta1, double beta2, double eps,
                              double weight_decay, bool amsgrad, bool maximize,
                              bool decoupled_weight_decay,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  return restore_adam_step_impl(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                state_steps, lr, std::nullopt, beta1, beta2, eps, weight_decay,
                                amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf,
                                sumsqs);
}

void perturb_tensor_rho_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                         const at::Tensor& sumsq, const at::Tensor& rho, double eps,
                         bool adaptive, double eta, at::TensorList masks, c10::IntArrayRef salts,
                         int64_t step_key, int64_t threshold) {
  perturb_impl(params, grads, backups, sumsq, 0.0, rho, eps, adaptive, eta, masks, salts,
               step_key, threshold);
}

at::Tensor restore_sgd_step_tensor_lr_(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups, at::TensorList momentum_buffers,
                                       const at::Tensor& lr, double weight_decay, double momentum,
                                       double dampening, bool nesterov, bool maximize,
                                       bool first_step,
                                       const std::optional<at::Tensor>& grad_scale,
                                       const std::optional<at::Tensor>& found_inf,
                                       at::TensorList sumsqs) {
  return restore_sgd_step_impl(params, grads, backups, momentum_buffers, 0.0, lr, weight_decay,
                               momentum, dampening, nesterov, maximize, first_step, grad_scale,
                               found_inf, sumsqs);
}

at::Tensor restore_adam_step_tensor_lr_(
    at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
    bool amsgrad, bool maximize, bool decoupled_weight_decay,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    at::TensorList sumsqs) {
  return restore_adam_step_impl(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                state_steps, 0.0, lr, beta1, beta2, eps, weight_decay, amsgrad,
                                maximize, decoupled_weight_decay, grad_scale, found_inf, sumsqs);
}

at::Tensor dot_partials(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "fused_sam: b has ", b.size(), " tensors, expected ", a.size());
  check_params(a);
  check_list(b, a, "b");
  const c10::cuda::CUDAGuard guard(a[0].device());
  const LaunchTable t = make_table(a, {{a, true}, {b, true}});
  at::Tensor out = at::empty({kCudaNormPartials}, a[0].options().dtype(at::kDouble));
  check(ck::launch_dot(kernel_dtype(a[0].scalar_type()), t, workspace(a[0].get_device(), stream()),
                       out.data_ptr<double>(), stream()));
  return out;
}

void axpby_(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coefs,
            const std::optional<at::Tensor>& skip) {
  check_params(out);
  check_list(x, out, "x");
  check_list(y, out, "y");
  check_axpby_scalars(coefs, skip, out[0].device());
  bump_versions({out});
  const c10::cuda::CUDAGuard guard(out[0].device());
  std::vector<at::Tensor> keep;
  // The kernel reads the coefficients and the flag from device memory: no host synchronisation.
  const float* flag = device_scalar(skip, out[0], keep, "skip");
  const LaunchTable t = make_table(out, {{out, true}, {x, true}, {y, true}});
  if (t.chunks == 0) {
    return;
  }
  check(ck::launch_axpby(kernel_dtype(out[0].scalar_type()), t, coefs.const_data_ptr<double>(),
                         coefs.stride(0), flag, stream()));
}

}  // namespace fused_sam::cuda

#endif  // FUSED_SAM_WITH_CUDA
