// Torch-facing glue of the CUDA kernels: argument checks, pointer tables, launches.
//
// Compiled only into a CUDA build (FUSED_SAM_WITH_CUDA); the kernels themselves are in
// sam_kernels.cu and know nothing of torch. A pointer table is built on the host for each call,
// compared with the tables already on the device, and uploaded only when it is new (some
// data_ptr changed, e.g. grads reallocated after zero_grad(set_to_none=True)); a steady training
// loop therefore makes no host-to-device copy. Scalars that change every step (the norm, the
// loss scale, found_inf, device step counters) are read by the kernels from device memory.
#ifdef FUSED_SAM_WITH_CUDA

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <vector>

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

// Blocks that fit on the device at once (4 blocks of 512 threads per SM): the grid cap.
int max_grid(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache.emplace(device, sms * (2048 / ck::kThreads)).first;
  }
  return it->second;
}

int grid_for(const ck::Table& t, int device, int64_t cap = INT32_MAX) {
  return ck::launch_grid(t.chunks, max_grid(device), cap);  // harness.h: the host build's too
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

// ---------------------------------------------------------------------------------------------
// Pointer tables

class TableCache {
 public:
  // The device copy of `host` (layout `layout`), uploading it only when no cached table matches.
  // `keep` receives the table's storage, so that an eviction by another thread cannot free it
  // before the launch is enqueued.
  ck::Table get(std::vector<int64_t> host, const ck::TableLayout& layout, at::Device device,
                at::Tensor& keep) {
    const uint64_t key = hash(host, device);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key && it->device == device && it->host == host) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        keep = entries_.front().data;
        return table(entries_.front());
      }
    }
    Entry e{key, device, std::move(host), {}, layout};
    at::Tensor staged = at::from_blob(e.host.data(), {static_cast<int64_t>(e.host.size())},
                                      at::TensorOptions().dtype(at::kLong));
    e.data = staged.to(device, /*non_blocking=*/false, /*copy=*/true);
    entries_.push_front(std::move(e));
    if (entries_.size() > kMaxEntries) {
      entries_.pop_back();
    }
    keep = entries_.front().data;
    return table(entries_.front());
  }

 private:
  struct Entry {
    uint64_t key;
    at::Device device;
    std::vector<int64_t> host;
    at::Tensor data;
    ck::TableLayout layout;
  };

  static constexpr size_t kMaxEntries = 64;

  static uint64_t hash(const std::vector<int64_t>& v, at::Device device) {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(device.index());
    for (const int64_t x : v) {
      h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    }
    return h;
  }

  static ck::Table table(Entry& e) {
    return ck::Table{e.data.data_ptr<int64_t>(), e.layout,
                     e.host[e.layout.chunk_begin_at() + e.layout.n]};
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
  static_cast<ck::Table&>(out) = cache().get(std::move(host), layout, params[0].device(), out.keep);
  return out;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void launch_restore(at::TensorList params, at::TensorList backups) {
  const LaunchTable t = make_table(params, {{params, true}, {backups, true}});
  if (t.chunks > 0) {
    check(ck::launch_restore(kernel_dtype(params[0].scalar_type()), t,
                             grid_for(t, params[0].get_device()), stream()));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive,
                            double eta) {
  check_params(grads);
  check_list(params, grads, "params");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto opts = grads[0].options().dtype(at::kDouble);
  const LaunchTable t = make_table(grads, {{grads, true}, {params, adaptive}});
  if (t.chunks == 0) {
    return at::zeros({kCudaNormPartials}, opts);
  }
  at::Tensor out = at::empty({kCudaNormPartials}, opts);
  const int grid = grid_for(t, grads[0].get_device(), kCudaNormPartials);
  check(ck::launch_norm_sq(kernel_dtype(grads[0].scalar_type()), t, adaptive, eta,
                           out.data_ptr<double>(), static_cast<int>(kCudaNormPartials), grid, stream()));
  return out;
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks, c10::IntArrayRef salts, int64_t step_key,
              int64_t threshold) {
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
                           s.scalar_type() == at::kDouble, s.numel(), rho, eps, adaptive, eta,
                           grid_for(t, params[0].get_device()), stream()));
}

void restore_(at::TensorList params, at::TensorList backups) {
  check_params(params);
  check_list(backups, params, "backups");
  bump_versions({params});
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_restore(params, backups);
}

void restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList momentum_buffers, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       bool first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
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
  ck::SgdArgs args{lr,
                   weight_decay,
                   momentum,
                   dampening,
                   nesterov,
                   maximize,
                   first_step,
                   with_momentum,
                   device_scalar(grad_scale, params[0], keep, "grad_scale"),
                   device_scalar(found_inf, params[0], keep, "found_inf")};
  const LaunchTable t = make_table(
      params, {{params, true},
               {grads, true},
               {backups, true},
               {with_momentum ? momentum_buffers : at::TensorList(), true}});
  if (t.chunks == 0) {
    return;
  }
  check(ck::launch_restore_sgd_step(kernel_dtype(params[0].scalar_type()), t, args,
                                    grid_for(t, params[0].get_device()), stream()));
}

void restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) {
    check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  }
  TORCH_CHECK(state_steps.size() == params.size(), "fused_sam: one step counter per parameter");
  bump_versions({params, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                 state_steps});
  const c10::cuda::CUDAGuard guard(params[0].device());
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
  std::vector<at::Tensor> keep;
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
                    device_scalar(grad_scale, params[0], keep, "grad_scale"),
                    device_scalar(found_inf, params[0], keep, "found_inf")};
  const ck::DType dtype = kernel_dtype(params[0].scalar_type());
  const auto launch = [&](at::TensorList p, at::TensorList g, at::TensorList b, at::TensorList m,
                          at::TensorList v, at::TensorList vmax, at::TensorList steps) {
    const LaunchTable t = make_table(p, {{p, true},
                                       {g, true},
                                       {b, true},
                                       {m, true},
                                       {v, true},
                                       {amsgrad ? vmax : at::TensorList(), true},
                                       {steps, false}});
    if (t.chunks > 0) {
      check(ck::launch_restore_adam_step(dtype, t, args, grid_for(t, p[0].get_device()),
                                         stream()));
    }
  };
  if (device_steps) {
    // Counters are read and advanced on the device: no host synchronisation.
    launch(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps);
    return;
  }
  // Counters on the host (torch.optim.Adam's default): whether to advance them depends on
  // found_inf, which costs one synchronisation when given. Keep them on the device
  // (capturable=True) to avoid it.
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    launch_restore(params, backups);
    return;
  }
  args.found_inf = nullptr;
  // Tensors that share a step count share the bias corrections: one launch per distinct count
  // (a single one unless some parameters missed steps).
  std::map<double, std::vector<size_t>> by_step;
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* p = s.data_ptr<float>();
      *p += 1.0f;
      step = *p;
    } else {
      TORCH_CHECK(s.scalar_type() == at::kDouble, "fused_sam: state_steps must be floating");
      double* p = s.data_ptr<double>();
      *p += 1.0;
      step = *p;
    }
    by_step[step].push_back(i);
  }
  for (const auto& [step, idx] : by_step) {
    args.step_size = lr / (1.0 - std::pow(beta1, step));
    args.bias_c2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
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
}

at::Tensor dot_partials(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "fused_sam: b has ", b.size(), " tensors, expected ", a.size());
  check_params(a);
  check_list(b, a, "b");
  const c10::cuda::CUDAGuard guard(a[0].device());
  const auto opts = a[0].options().dtype(at::kDouble);
  const LaunchTable t = make_table(a, {{a, true}, {b, true}});
  if (t.chunks == 0) {
    return at::zeros({kCudaNormPartials}, opts);
  }
  at::Tensor out = at::empty({kCudaNormPartials}, opts);
  const int grid = grid_for(t, a[0].get_device(), kCudaNormPartials);
  check(ck::launch_dot(kernel_dtype(a[0].scalar_type()), t, out.data_ptr<double>(),
                       static_cast<int>(kCudaNormPartials), grid, stream()));
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
                         coefs.stride(0), flag, grid_for(t, out[0].get_device()), stream()));
}

}  // namespace fused_sam::cuda

#endif  // FUSED_SAM_WITH_CUDA
