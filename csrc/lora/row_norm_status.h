// The status word of lowrank::dora_row_norm_4bit (CPU and CUDA): the forward's two questions about
// a DoRA layer's norm, answered on the device and read back with one copy.
#pragma once

namespace lowrank::lora {

constexpr int kRowNormStatusFlagged = 1;        // some row's bound exceeds rtol: recompute it exactly
constexpr int kRowNormStatusZeroMagnitude = 2;  // some m_o == 0: the backward rebuilds that column's z

}  // namespace lowrank::lora
