// Argument checks and bookkeeping shared by the CPU and CUDA implementations of the ops.
//
// functional.py only sends non-empty lists of dense tensors of one device and dtype whose
// strides agree per index; these checks keep a direct torch.ops call from reading memory out of
// bounds and say what is wrong instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <initializer_list>
#include <optional>

namespace fused_sam {

// The parameter list of an op: not empty, one device, one dtype, every tensor dense.
inline void check_params(at::TensorList params) {
  TORCH_CHECK(!params.empty(), "fused_sam: empty tensor list");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == params[0].device(), "fused_sam: tensor ", i, " is on ", p.device(),
                ", expected ", params[0].device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fused_sam: tensor ", i,
                " has dtype ", p.scalar_type(), ", expected ", params[0].scalar_type());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fused_sam: tensor ", i,
                " is not dense; route it to the foreach backend");
  }
}

// A list read or written alongside the parameters `like`: one tensor per parameter, each on its
// parameter's device, with its dtype, shape and strides.
inline void check_list(at::TensorList ts, at::TensorList like, const char* what) {
  TORCH_CHECK(ts.size() == like.size(), "fused_sam: ", what, " has ", ts.size(),
              " tensors, expected ", like.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const at::Tensor& p = like[i];
    TORCH_CHECK(t.device() == p.device(), "fused_sam: ", what, "[", i, "] is on ", t.device(),
                ", expected ", p.device());
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fused_sam: ", what, "[", i, "] has dtype ",
                t.scalar_type(), ", expected ", p.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fused_sam: ", what, "[",
                i, "] must have the shape and strides of the parameter");
  }
}

// Bit-packed masks (fused_sam.masks.pack_bits): none, or one contiguous uint8 tensor per
// parameter on its device, with at least ceil(numel / 8) bytes.
inline void check_masks(at::TensorList masks, at::TensorList params) {
  TORCH_CHECK(masks.empty() || masks.size() == params.size(),
              "fused_sam: masks must be empty or one per parameter");
  for (size_t i = 0; i < masks.size(); ++i) {
    const int64_t bytes = (params[i].numel() + 7) / 8;
    TORCH_CHECK(masks[i].scalar_type() == at::kByte && masks[i].is_contiguous() &&
                    masks[i].device() == params[i].device() && masks[i].numel() >= bytes,
                "fused_sam: masks[", i, "] must be a contiguous uint8 tensor on ",
                params[i].device(), " of at least ", bytes, " bytes");
  }
}

// A random mask (fused_sam.masks.RandomBits): no salts (no random mask), or one 32-bit salt per
// parameter with a 32-bit step key and a threshold in [1, 2^32), and then no bit-packed masks.
inline void check_random(c10::IntArrayRef salts, int64_t step_key, int64_t threshold,
                         at::TensorList masks, at::TensorList params) {
  if (salts.empty()) {
    return;
  }
  constexpr int64_t k32 = int64_t{1} << 32;
  TORCH_CHECK(salts.size() == params.size(), "fused_sam: salts has ", salts.size(),
              " entries, expected one per parameter (", params.size(), ")");
  TORCH_CHECK(masks.empty(), "fused_sam: a random mask (salts) and bit masks exclude each other");
  TORCH_CHECK(step_key >= 0 && step_key < k32 && threshold >= 1 && threshold < k32,
              "fused_sam: step_key must be in [0, 2^32) and threshold in [1, 2^32)");
  for (size_t i = 0; i < salts.size(); ++i) {
    TORCH_CHECK(salts[i] >= 0 && salts[i] < k32, "fused_sam: salts[", i, "] is not 32-bit");
  }
}

// The scalars of axpby_: `coefs` (a, b) as one 1-D float64 tensor of two elements, and an
// optional one-element `skip` flag, both on the device of the tensors (a kernel reads them there,
// so a device never waits for the host).
inline void check_axpby_scalars(const at::Tensor& coefs, const std::optional<at::Tensor>& skip,
                                at::Device device) {
  TORCH_CHECK(coefs.scalar_type() == at::kDouble && coefs.dim() == 1 && coefs.numel() == 2 &&
                  coefs.device() == device,
              "fused_sam: coefs must be a 1-D float64 tensor of 2 elements on ", device, ", got ",
              coefs.scalar_type(), " of shape ", coefs.sizes(), " on ", coefs.device());
  TORCH_CHECK(!skip.has_value() || (skip->numel() == 1 && skip->device() == device),
              "fused_sam: skip must be a one-element tensor on ", device);
}

// Like an in-place ATen op, an op that writes a tensor bumps its version counter, so autograd
// refuses a backward through a graph that saved the tensor before the write. (The dispatcher
// does not do this for TORCH_LIBRARY ops with mutable arguments.)
inline void bump_versions(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList list : lists) {
    for (const at::Tensor& t : list) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace fused_sam
