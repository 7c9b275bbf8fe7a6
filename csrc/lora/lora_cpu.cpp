// CPU entries of the LoRA/DoRA ops: the math as PyTorch ops (lora_checks.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lora/lora_checks.h"

namespace lowrank::lora {
namespace {

std::tuple<at::Tensor, at::Tensor> column_reduce_cpu(const at::Tensor& dy, const at::Tensor& h,
                                                     const std::optional<at::Tensor>& y) {
  check_column_reduce(dy, h, y);
  return column_reduce_reference(dy, h, y);
}

}  // namespace
}  // namespace lowrank::lora

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_column_reduce", &lowrank::lora::column_reduce_cpu);
}
