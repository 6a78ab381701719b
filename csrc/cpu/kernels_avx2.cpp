// The CPU kernels for x86-64 CPUs with AVX2, FMA and F16C (at::vec's 256-bit intrinsics).
//
// setup.py compiles this file alone with -mavx2 -mfma -mf16c and links its object after every
// other, so any inline function it shares with the rest of the extension resolves to the
// portable copy; sam_cpu.cpp only calls into it after checking the CPU (see active_kernels).
// Built only on x86-64, where setup.py also defines FUSED_SAM_CPU_AVX2 for every source.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.inc"
