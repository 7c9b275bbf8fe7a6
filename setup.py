"""Builds lowrank._C, the extension that registers every lowrank op.

This file is the authoritative build. Sources are found by rule, never listed by hand (the
CMakeLists.txt applies the same rule): every csrc/**/*.cpp is built, except that files ending in
_cuda.cpp and every csrc/**/*.cu join only when torch has CUDA and nvcc is found. A CPU-only build
still defines every op schema; the CUDA backends simply are not registered.

TORCH_CUDA_ARCH_LIST picks the GPU targets (default below); MAX_JOBS the parallel compiles.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (A100), Ada (L4/4090) and Hopper with its sm_90a-only instructions (wgmma).
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0a"


def sources(with_cuda: bool) -> list[str]:
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not with_cuda:
        return [s for s in cpp if not s.endswith("_cuda.cpp")]
    return cpp + sorted(glob.glob("csrc/**/*.cu", recursive=True))


def extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("LOWRANK_FORCE_CPU") == "1":
        with_cuda = False
    # -ffp-contract=off: quantization must match the reference bit for bit, so no product and
    # sum may fuse into one rounding (the nested absmax is qmap * scale, then + offset).
    cxx = ["-O3", "-ffp-contract=off"]  # the C++ standard is torch's choice
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension("lowrank._C", sources(False), include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, py_limited_api=False)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    # cuBLASLt: lowrank::mm_tuned calls it directly (csrc/gemm/mm_tuned_cuda.cpp)
    return CUDAExtension("lowrank._C", sources(True), include_dirs=include_dirs, libraries=["cublasLt"],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="lowrank",
    version="0.1.0",
    description="QLoRA and DoRA kernels for PyTorch: NF4/FP4 quantization, fused 4-bit matmul, LoRA, DoRA",
    packages=find_packages(include=["lowrank", "lowrank.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors"],
    extras_require={"test": ["pytest", "hypothesis", "scipy", "transformers", "peft"], "bench": ["matplotlib"],
                    "hf": ["transformers"]},
    ext_modules=[extension()],
    cmdclass=cmdclass(),
)
