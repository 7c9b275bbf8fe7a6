// Lets one function body serve both the CPU (.cpp) and CUDA (.cu) builds, so that the exact
// arithmetic of quantization is written once.
#pragma once
#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif
