// Host/device qualifiers shared by the CPU and CUDA translation units.
#pragma once
#if defined(__CUDACC__)
#define PFB_HD __host__ __device__ __forceinline__
#else
#define PFB_HD inline __attribute__((always_inline))
#endif
