// The CPU kernels for any CPU of the target architecture (at::vec's portable vectors, which the
// compiler maps to the baseline instruction set, e.g. SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#include "kernels.inc"
