// The per-element code searches of 4-bit and 8-bit quantization, shared by the CPU and CUDA
// kernels. Plain C++: no torch, no CUDA headers. The math is specified in lowrank/reference.py.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace lowrank::quant {

// NaN-propagating max of magnitudes: fmaxf would drop a NaN and hide a bad weight, torch.amax
// (the reference) keeps it; the Python layer then rejects non-finite input.
LOWRANK_HD float max_propagate_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Rank of xn among 15 ascending thresholds = #{i : xn > t[i]}, by a 4-step binary search (12
// instructions instead of 15 compare-and-adds; equal to the count for any non-decreasing table).
// NaN fails every comparison and gets rank 0.
LOWRANK_HD int rank_sorted_15(float xn, const float* t) {
  int r = (xn > t[7]) ? 8 : 0;
  r += (xn > t[r + 3]) ? 4 : 0;
  r += (xn > t[r + 1]) ? 2 : 0;
  r += (xn > t[r]) ? 1 : 0;
  return r;
}

// Rank of a magnitude among 7 ascending thresholds (FP4's sign-magnitude mode).
LOWRANK_HD int rank_sorted_7(float m, const float* t) {
  int r = (m > t[3]) ? 4 : 0;
  r += (m > t[r + 1]) ? 2 : 0;
  r += (m > t[r]) ? 1 : 0;
  return r;
}

// 4-bit code of a normalized value. sorted mode: code_of_rank[rank]; sign-magnitude mode: sign
// bit 0b1000 for xn < 0, magnitude code code_of_rank[rank of |xn| among t[0..6]].
LOWRANK_HD uint32_t code_4bit(float xn, const float* thresholds, const uint8_t* code_of_rank,
                              bool sign_magnitude) {
  if (sign_magnitude) {
    const float m = xn < 0.0f ? -xn : xn;
    return code_of_rank[rank_sorted_7(m, thresholds)] | (xn < 0.0f ? 8u : 0u);
  }
  return code_of_rank[rank_sorted_15(xn, thresholds)];
}

// bitsandbytes' 8-bit code search over a sorted 256-entry map (see reference.code_8bit): 7
// halving steps from index 127, then the midpoint test against the neighbour on x's side. The
// search path decides exact ties, so it is reproduced step by step.
LOWRANK_HD uint32_t code_8bit(float x, const float* qmap) {
  int pivot = 127, lower_idx = 0, upper_idx = 255;
  float lower = -1.0f, upper = 1.0f;
  float val = qmap[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    // written as selects, not branches: the searches of one thread can then overlap
    const bool up = x > val;
    lower_idx = up ? pivot : lower_idx;
    lower = up ? val : lower;
    upper_idx = up ? upper_idx : pivot;
    upper = up ? upper : val;
    pivot = up ? pivot + step : pivot - step;
    val = qmap[pivot];
  }
  if (upper_idx == 255) upper = qmap[255];
  if (lower_idx == 0) lower = qmap[0];
  if (x > val) return (x > (upper + val) * 0.5f) ? upper_idx : pivot;
  return (x < (lower + val) * 0.5f) ? lower_idx : pivot;
}

}  // namespace lowrank::quant
