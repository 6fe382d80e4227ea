#pragma once
// MEDVL_HD: a small function both the CUDA kernels and the host (the CPU kernels, the host emulations of
// the CUDA blocks) call; inline on the host compiler.
#if defined(__CUDACC__)
#define MEDVL_HD __host__ __device__ __forceinline__
#else
#define MEDVL_HD inline
#endif
