// The launch-side view of a checked 4-bit weight (for the CUDA entries only: it includes the
// launch headers, which need cuda_runtime.h).
#pragma once
#include "gemm/gemm_checks.h"
#include "quant/quant_launch.h"

namespace lowrank::gemm {

// Fills the weight's fields of any kernel parameter struct (they all derive from Packed4bitWeight).
inline void set_packed_weight(quant::Packed4bitWeight& p, const Weight4bit& w) {
  p.packed = w.packed.const_data_ptr<uint8_t>();
  p.n = w.out_features;
  p.k = w.in_features;
  p.blocksize = int(w.blocksize);
  p.values = w.values.const_data_ptr<float>();
  if (w.nested()) {
    p.absmax_codes = w.absmax.const_data_ptr<uint8_t>();
    p.nested_absmax = w.nested_absmax->const_data_ptr<float>();
    p.nested_qmap = w.nested_qmap->const_data_ptr<float>();
    p.offset = w.offset->const_data_ptr<float>();
    p.nested_blocksize = int(w.nested_blocksize);
  } else {
    p.absmax = w.absmax.const_data_ptr<float>();
  }
}

}  // namespace lowrank::gemm
