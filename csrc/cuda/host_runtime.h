// The two CUDA runtime names that sam_kernels.h's declarations use, for the host build of the
// kernels (host_driver.cc, FUSED_SAM_CUDA_HOST_BUILD), which compiles without the CUDA toolkit.
#pragma once

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
