// Fused 4-bit matmuls on Hopper (sm_90a) with the weight dequantized into shared memory by
// warpgroups of their own and both wgmma operands read from shared memory, so the consumer
// warpgroups only issue wgmma, as in a bf16 GEMM. Math: lowrank/reference.py matmul_4bit; each
// weight element is values[code] * absmax in fp32 rounded once to the 16-bit type (the dequantize
// kernel's operations), products accumulated in fp32 by the tensor cores.
//
// Two uses, one kernel (GRAD below):
// - The backward's dX = dY @ W for 16 < M <= 256 (lowrank::matmul_4bit_grad_x, path "wgmma"): the
//   dequantized tile is W^T, which wgmma reads as a transposed (M-major) A straight from W's own
//   layout; before it, that M took the weight dequantized into a temporary + cuBLAS. H100,
//   graph-timed (scripts/grad_x_quick.py), 28672 x 8192 at M = 17 / 64 / 128 / 256: 175 / 152 / 174
//   / 260 us against 380-395 dequantize + cuBLAS and 156-206 for bf16 dY @ W.
// - The forward, as an alternative to gemm_4bit_wgmma.cu (whose consumers dequantize into wgmma's
//   register A operand), picked only by LOWRANK_WGMMA_KERNEL=ss: it is slower there. 28672 x 8192,
//   same runs: M = 128 (128 x 128 tiles) 179 against 142 us, M = 2048 (128 x 256) 2194-2310
//   against 1649-1667. Diagnostic builds (branch wip/wgmma-ss) measured why at M = 2048: with no
//   wgmma the dequantizing warpgroup alone took 1406 us (one warp per scheduler, ~1480 cycles per
//   k step against ~1024 for the tensor cores), and with no lookups (the codes or zeros stored as
//   the tile) the kernel still took 1405-1695 us: the stores of the A tile and their proxy fences
//   cost on top of the copies and the wgmma's shared-memory reads. With 128-token tiles three
//   dequantizing warpgroups fit (their registers): without wgmma they took 128 us at M = 128,
//   without lookups 161 us. The backward has no such rival: its alternative writes and reads the
//   whole dequantized weight.
//
// Counts (per CTA and 64-wide step, 128 output rows x 256 tokens): 2 x 4 wgmma m64n256k16 = 2.1 M
// multiply-adds, ~1024 cycles at the H100's dense bf16 rate; 8192 weight elements to dequantize,
// one thread per 64 codes of a weight row: 8 words of codes, 16 lookups of 4 elements (12
// instructions each, the byte-permute lookup of wgmma_common.cuh), the row's 16-entry scaled
// table (one absmax per 64 codes: blocksize >= 64), 8 16-byte stores; ~260 instructions per thread
// and step. Shared memory per step: the x (dY) tile by TMA (32 KB), the A tile (16 KB) from the
// dequantizing threads, both read by the wgmma.
//
// Warp roles (one CTA per SM):
// - DW dequantizing warpgroups take the steps in turn. Thread r's codes (32 bytes per step) and
//   absmax are loaded a few of its steps ahead into registers; per step it builds the row's scaled
//   table, waits for the stage to be free, writes its 64 elements as 8 16-byte pieces of row r of
//   the A tile in the 128-byte swizzle (conflict-free: a quarter warp's 8 rows put piece q at 8
//   distinct positions q ^ (r % 8)), fences them for the async proxy (wgmma reads shared memory
//   through it) and arrives on the stage's full barrier; its thread 0 also issues the stage's TMA
//   copy of x (dY), whose bytes the same barrier counts.
// - Two consumer warpgroups of 64 output rows: per stage 4 wgmma (A and B by descriptor), then the
//   previous stage goes back to the dequantizers once its group is done.
// Registers move with setmaxnreg (SsConfig). Epilogue: the x stages are reused as the staging tile
// (wgmma_common.cuh), 16-byte stores; or, with the reduction cut into ranges (the backward on few
// row tiles), fp32 partial sums added in range order by a second launch (deterministic).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "common/cuda_float.cuh"
#include "gemm/gemm_launch.h"
#include "gemm/hopper.cuh"
#include "gemm/wgmma_common.cuh"
#include "gemm/wgmma_ss.cuh"

namespace lowrank::gemm {
namespace {

constexpr int kRows = 128;  // weight rows per CTA: two consumer warpgroups of 64
constexpr int kTileK = kWgmmaTileK;
constexpr int kABytes = kRows * kTileK * 2;  // 16 KB: the dequantized weight tile of one k step

// Per token tile BT (wgmma's N): the dequantizing warpgroups (DW, taking the k steps in turn: WG
// d does kt = d, d + DW, ...), the stage ring (a multiple of DW, so that every round of a stage
// is written by the same warpgroup: a barrier's parity tells only two rounds apart), the code
// loads' lookahead (in the warpgroup's own steps) and the registers per thread after setmaxnreg
// (dequantizers x 128 DW + consumers x 256 within the entry allocation).
template <int BT>
struct SsConfig;
template <>
struct SsConfig<256> {
  static constexpr int kDequantWarpgroups = 1, kStages = 4, kLookahead = 3;
  static constexpr int kDequantRegs = 104, kConsumerRegs = 200;  // 128 x 104 + 256 x 200 <= 384 x 168
};
template <>
struct SsConfig<128> {
  static constexpr int kDequantWarpgroups = 3, kStages = 6, kLookahead = 2;
  static constexpr int kDequantRegs = 80, kConsumerRegs = 120;  // 384 x 80 + 256 x 120 <= 640 x 96
};
template <int BT>
struct SsTile : SsConfig<BT> {
  using C = SsConfig<BT>;
  static constexpr int kThreads = 128 * C::kDequantWarpgroups + 256;
  static constexpr int kXBytes = BT * kTileK * 2;  // one TMA box of 128-byte rows
  static constexpr int kXOff = 0;                  // 1024-aligned: the swizzle repeats every 1024 bytes
  static constexpr int kAOff = kXOff + C::kStages * kXBytes;
  static constexpr int kBarOff = kAOff + C::kStages * kABytes;
  static constexpr int kBytes = kBarOff + 2 * C::kStages * 8;
  static constexpr int kAlloc = kBytes + 1024;  // the dynamic base is aligned up to 1024 in the kernel
  static constexpr int kOutBytes = BT * kOutPitch * 2;  // staging of one 64-row block
  static_assert(C::kStages % C::kDequantWarpgroups == 0, "a stage's rounds come from one warpgroup");
  static_assert(2 * kOutBytes <= C::kStages * kXBytes, "the output staging reuses the x stages");
  static_assert(kAlloc + 16 * 4 + 256 * 4 <= 227 * 1024, "shared memory per CTA");
};

struct SsArgs {
  const uint8_t* packed;
  const float* values;
  const float* absmax;          // non-nested
  const uint8_t* absmax_codes;  // nested
  const float* nested_absmax;
  const float* nested_qmap;
  const float* offset;
  int blocksize_log2, nested_blocksize_log2;
  int n, k, m;  // the weight's N x K, the tokens
  // The tile grid: out_dim rows (N forward, K backward) x m tokens; the reduction in red_steps
  // steps of 64 (K / 64 forward, ceil(N / 64) backward), cut into `splits` ranges of
  // steps_per_split, one CTA per (tile, range); with splits > 1 fp32 partial sums [split][m][out_dim].
  int out_dim, red_steps, splits, steps_per_split;
  float* partial;
  int row_tiles, token_tiles;
  bool thread_release;  // every consumer thread arrives on the stage's empty barrier (else lane 0 per warp)
  const void* bias;
  void* out;
};

using hopper::smem_addr;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using hopper::mbar_arrive;
using hopper::mbar_expect_tx;
using hopper::mbar_init;
using hopper::mbar_wait;
using hopper::tma_load_2d;

__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
// Ordinary shared-memory stores made visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// GRAD = false: y [m, N] = x W^T, A = a tile of W (K-major: a weight row's k contiguous), the copied
// operand x. GRAD = true: dX [m, K] = dY W, computed as dX^T = W^T dY^T: A = a tile of W^T, which in
// W's layout is M-major (wgmma's transposed A: k contiguous along A's rows), the copied operand dY,
// the reduction over W's rows. The dequantizing thread's work is the same 64 codes of one weight
// row in both: forward, thread r owns weight row row0 + r across the k steps; backward, thread r
// owns the 64-wide k chunk row0 + 64 (r / 64) of weight row 64 step + r % 64. Either way its 128
// bytes are row r of the stage's A tile (8 KB per consumer warpgroup: rows 64 cw .. 64 cw + 63),
// 128-byte swizzled: K-major atoms forward (8 weight rows x 64 k), M-major atoms backward (8
// weight rows = 8 steps of A's K x 64 k = A's M).
template <typename T, int BT, bool NESTED, bool GRAD>
__global__ void __launch_bounds__(SsTile<BT>::kThreads, 1)
    gemm_4bit_wgmma_ss_kernel(const __grid_constant__ CUtensorMap b_map, const SsArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = SsTile<BT>;
  constexpr int S = Cfg::kStages;
  constexpr int DW = Cfg::kDequantWarpgroups;
  extern __shared__ uint8_t smem_raw[];
  __shared__ float s_qmap[256];
  __shared__ float4 s_values[4];
  // aligned by an offset from the shared array itself, so that the compiler keeps seeing shared
  // addresses (ld.shared, not generic loads)
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t full_bar = smem_base + Cfg::kBarOff;  // + 8 s
  const uint32_t empty_bar = full_bar + 8 * S;

  const int tiles = p.row_tiles * p.token_tiles;
  const int split = int(blockIdx.x) / tiles;  // CTAs of one range of steps are neighbours in the grid
  int row0, token0;
  raster_origin(int(blockIdx.x) - split * tiles, p.row_tiles, p.token_tiles, kRows, BT, row0, token0);
  const int step0 = split * p.steps_per_split;
  const int n_steps = min(p.steps_per_split, p.red_steps - step0);  // this CTA's steps: step0 + i, stage i % S

  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += Cfg::kThreads) s_qmap[i] = p.nested_qmap[i];
  if (threadIdx.x < 16) reinterpret_cast<float*>(s_values)[threadIdx.x] = p.values[threadIdx.x];
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + 8 * s, 128);  // the 128 threads of the step's warpgroup; its thread 0 adds x's bytes
      mbar_init(empty_bar + 8 * s, p.thread_release ? 256 : 8);  // the consumer threads, or lane 0 of each warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup < DW) {
    // ---- dequantize: warpgroup d takes the steps d, d + DW, ... of the CTA's range; its thread
    // 0 also copies those steps' tiles of x (dY) ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Cfg::kDequantRegs));
    const int d = warpgroup;
    const int r = threadIdx.x % 128;
    const float offset = NESTED ? *p.offset : 0.0f;
    // The 64 codes of step i (of this CTA's range): the weight row and k chunk by the operand's
    // orientation; rows past N and chunks past K dequantize to zeros (codes 0, absmax 0): their
    // products are never stored (forward) or add zeros (backward).
    auto load = [&](int i, uint4& lo, uint4& hi, uint32_t& code, float& scale) {
      lo = hi = make_uint4(0u, 0u, 0u, 0u);
      code = 0;
      scale = 0.0f;
      const int step = step0 + i;
      const int w_row = GRAD ? 64 * step + r % 64 : row0 + r;
      const int w_col = GRAD ? row0 + 64 * (r / 64) : 64 * step;
      if (i < n_steps && w_row < p.n && w_col < p.k) {
        const int64_t element = int64_t(w_row) * p.k + w_col;  // a multiple of 64: 32 code bytes
        const uint4* codes = reinterpret_cast<const uint4*>(p.packed + element / 2);
        lo = __ldg(codes);
        hi = __ldg(codes + 1);
        const int64_t block = element >> p.blocksize_log2;
        if (NESTED) {
          code = __ldg(p.absmax_codes + block);
          scale = __ldg(p.nested_absmax + (block >> p.nested_blocksize_log2));
        } else {
          scale = __ldg(p.absmax + block);
        }
      }
    };
    // The queue of code/absmax loads is unrolled by its depth so that each slot stays in its
    // registers (shifting the queue would wait on the newest load at every step).
    constexpr int L = Cfg::kLookahead;
    uint4 q_lo[L], q_hi[L];
    uint32_t a_code[L];
    float a_scale[L];
#pragma unroll
    for (int i = 0; i < L; ++i) load(d + DW * i, q_lo[i], q_hi[i], a_code[i], a_scale[i]);
    const uint32_t a_row = smem_base + Cfg::kAOff + r * 128;  // this row's 128 bytes in stage 0
    const uint32_t swizzle = uint32_t(r & 7);
    for (int i0 = d; i0 < n_steps; i0 += DW * L) {
#pragma unroll
      for (int j = 0; j < L; ++j) {
        const int i = i0 + DW * j;
        if (i >= n_steps) break;
        const int s = i % S;
        float values[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 v = s_values[q];
          values[4 * q] = v.x, values[4 * q + 1] = v.y, values[4 * q + 2] = v.z, values[4 * q + 3] = v.w;
        }
        const float absmax = NESTED ? __fadd_rn(__fmul_rn(s_qmap[a_code[j]], a_scale[j]), offset) : a_scale[j];
        uint4 table_lo, table_hi;
        build_table<T>(values, absmax, table_lo, table_hi);
        const uint32_t w[8] = {q_lo[j].x, q_lo[j].y, q_lo[j].z, q_lo[j].w, q_hi[j].x, q_hi[j].y, q_hi[j].z, q_hi[j].w};
        mbar_wait(empty_bar + 8 * s, ((i / S) & 1) ^ 1);
        if (r == 0) {
          mbar_expect_tx(full_bar + 8 * s, Cfg::kXBytes);
          tma_load_2d(smem_base + Cfg::kXOff + s * Cfg::kXBytes, &b_map, (step0 + i) * kTileK, token0, full_bar + 8 * s);
        }
        // word q = code bytes 4q..4q+3 = elements 8q..8q+7 = the row's 16-byte piece q
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          uint32_t e01, e23, e45, e67;
          lookup4(w[q], table_lo, table_hi, e01, e23);
          lookup4(w[q] >> 16, table_lo, table_hi, e45, e67);
          st_shared_v4(a_row + s * kABytes + ((uint32_t(q) ^ swizzle) << 4), e01, e23, e45, e67);
        }
        fence_proxy_async_shared();
        mbar_arrive(full_bar + 8 * s);
        load(i + DW * L, q_lo[j], q_hi[j], a_code[j], a_scale[j]);
      }
    }
  } else {
    // ---- consumers: warpgroup cw multiplies weight rows 64 cw .. 64 cw + 63 of the tile ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Cfg::kConsumerRegs));
    const int cw = warpgroup - DW;
    const int lane = threadIdx.x % 32;
    const int warp = (threadIdx.x / 32) % 4;
    const int g = lane / 4, t = lane % 4;
    const uint64_t a_desc0 = swizzle128_desc(smem_base + Cfg::kAOff + cw * 64 * 128);
    const uint64_t x_desc0 = swizzle128_desc(smem_base + Cfg::kXOff);
    float acc[BT / 2];
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[i] = 0.0f;
    // a k16 step of A: 32 bytes along a K-major row (forward), 16 rows of 128 bytes (backward)
    constexpr int kA16 = GRAD ? 2048 : 32;
    for (int i = 0; i < n_steps; ++i) {
      const int s = i % S;
      mbar_wait(full_bar + 8 * s, (i / S) & 1);
      fence_registers(acc);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wgmma_ss<BT, T, GRAD>(acc, a_desc0 + uint64_t((s * kABytes + kA16 * j) >> 4),
                              x_desc0 + uint64_t((s * Cfg::kXBytes + 32 * j) >> 4), 1u);
      wgmma_commit();
      fence_registers(acc);
      wgmma_wait<1>();  // the previous stage's group is done: give that stage back
      fence_registers(acc);
      if (i > 0) {
        if (p.thread_release) {
          mbar_arrive(empty_bar + 8 * ((i - 1) % S));
        } else {
          __syncwarp();
          if (lane == 0) mbar_arrive(empty_bar + 8 * ((i - 1) % S));
        }
      }
    }
    wgmma_wait<0>();
    fence_registers(acc);
    if (GRAD && p.splits > 1) {
      // ---- a range's partial sums, fp32, [split][token][row]; added in range order afterwards ----
      const int row_lo = row0 + 64 * cw + 16 * warp + g, row_hi = row_lo + 8;
      float* partial = p.partial + int64_t(split) * p.m * p.out_dim;
#pragma unroll
      for (int j = 0; j < BT / 8; ++j) {
        const int tok = token0 + 8 * j + 2 * t;
        if (tok < p.m) {
          if (row_lo < p.out_dim) partial[int64_t(tok) * p.out_dim + row_lo] = acc[4 * j];
          if (row_hi < p.out_dim) partial[int64_t(tok) * p.out_dim + row_hi] = acc[4 * j + 2];
        }
        if (tok + 1 < p.m) {
          if (row_lo < p.out_dim) partial[int64_t(tok + 1) * p.out_dim + row_lo] = acc[4 * j + 1];
          if (row_hi < p.out_dim) partial[int64_t(tok + 1) * p.out_dim + row_hi] = acc[4 * j + 3];
        }
      }
      return;
    }
    // ---- epilogue: both consumers' groups are done before either overwrites the x stages ----
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    stage_accumulators<T, BT>(reinterpret_cast<T*>(smem + Cfg::kXOff + cw * Cfg::kOutBytes), acc,
                              static_cast<const T*>(p.bias), row0 + 64 * cw, 16 * warp + g, t, p.out_dim);
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
    store_staged<T, BT>(smem + Cfg::kXOff, Cfg::kOutBytes, cw, 1, threadIdx.x - 128 * warpgroup, row0, token0, p.m,
                        p.out_dim, static_cast<T*>(p.out));
  }
#else
  __trap();  // built for a target without wgmma: the launcher refuses before getting here
#endif
}

// The copied operand (x [m, K] forward, dY [m, N] backward: `b` with `cols` columns) by TMA boxes
// of 64 columns x BT tokens in the 128-byte swizzle; one CTA per (tile, range of steps).
template <typename T, int BT, bool NESTED, bool GRAD>
const char* launch_typed(const void* b, int64_t cols, const SsArgs& args, cudaStream_t stream) {
  using Cfg = SsTile<BT>;
  PFN_cuTensorMapEncodeTiled_v12000 encode = hopper::tensor_map_encoder();
  if (encode == nullptr) return "the driver does not provide cuTensorMapEncodeTiled";
  CUtensorMap b_map;
  const CUtensorMapDataType b_type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t b_dims[2] = {cuuint64_t(cols), cuuint64_t(args.m)};
  const cuuint64_t b_strides[1] = {cuuint64_t(cols) * 2};
  const cuuint32_t b_box[2] = {kTileK, BT};
  const cuuint32_t unit[2] = {1, 1};
  if (encode(&b_map, b_type, 2, const_cast<void*>(b), b_dims, b_strides, b_box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return GRAD ? "cuTensorMapEncodeTiled rejected dy's tensor map" : "cuTensorMapEncodeTiled rejected x's tensor map";
  static std::once_flag attr_once;
  static cudaError_t attr_error = cudaSuccess;
  std::call_once(attr_once, [] {
    attr_error = cudaFuncSetAttribute(gemm_4bit_wgmma_ss_kernel<T, BT, NESTED, GRAD>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kAlloc);
  });
  if (attr_error != cudaSuccess) return "cudaFuncSetAttribute refused the kernel's shared memory";
  SsArgs a = args;
  a.row_tiles = int((a.out_dim + kRows - 1) / kRows);
  a.token_tiles = int((a.m + BT - 1) / BT);
  gemm_4bit_wgmma_ss_kernel<T, BT, NESTED, GRAD>
      <<<a.row_tiles * a.token_tiles * a.splits, Cfg::kThreads, Cfg::kAlloc, stream>>>(b_map, a);
  return nullptr;
}

template <typename T, bool GRAD>
const char* launch_tokens(const void* b, int64_t cols, const SsArgs& args, int tokens, cudaStream_t stream) {
  const bool nested = args.absmax_codes != nullptr;
  if (tokens == 256)
    return nested ? launch_typed<T, 256, true, GRAD>(b, cols, args, stream)
                  : launch_typed<T, 256, false, GRAD>(b, cols, args, stream);
  if (tokens == 128)
    return nested ? launch_typed<T, 128, true, GRAD>(b, cols, args, stream)
                  : launch_typed<T, 128, false, GRAD>(b, cols, args, stream);
  return "the ss kernel takes token tiles of 128 or 256";
}

int log2_exact(int v) { return __builtin_ctz(unsigned(v)); }

SsArgs weight_args(const quant::Packed4bitWeight& w, int64_t m) {
  SsArgs a{};
  a.packed = w.packed;
  a.values = w.values;
  a.absmax = w.absmax;
  a.absmax_codes = w.absmax_codes;
  a.nested_absmax = w.nested_absmax;
  a.nested_qmap = w.nested_qmap;
  a.offset = w.offset;
  a.blocksize_log2 = log2_exact(w.blocksize);
  a.nested_blocksize_log2 = w.absmax_codes != nullptr ? log2_exact(w.nested_blocksize) : 0;
  a.n = int(w.n);
  a.k = int(w.k);
  a.m = int(m);
  const char* release = std::getenv("LOWRANK_WGMMA_THREAD_RELEASE");  // A/B, read per launch
  a.thread_release = release != nullptr && release[0] == '1';
  return a;
}

}  // namespace

const char* launch_gemm_4bit_wgmma_ss(const Gemm4bitParams& p, int tokens, cudaStream_t stream) {
  if (((p.m + tokens - 1) / tokens) * ((p.n + kRows - 1) / kRows) >= (int64_t(1) << 31))
    return "it takes fewer than 2^31 tiles";
  SsArgs a = weight_args(p, p.m);
  a.out_dim = int(p.n);
  a.red_steps = int(p.k / kTileK);
  a.splits = 1;
  a.steps_per_split = a.red_steps;
  a.bias = p.bias;
  a.out = p.out;
  return p.kind == FloatKind::kBFloat16 ? launch_tokens<__nv_bfloat16, false>(p.x, p.k, a, tokens, stream)
                                        : launch_tokens<__half, false>(p.x, p.k, a, tokens, stream);
}

GradWgmmaPlan plan_gemm_4bit_grad_x_wgmma(int64_t m, int64_t n, int64_t k, int sms) {
  GradWgmmaPlan plan;
  plan.tokens = m <= 128 ? 128 : 256;
  const int64_t tiles = ((k + kRows - 1) / kRows) * ((m + plan.tokens - 1) / plan.tokens);
  const int64_t steps = (n + kTileK - 1) / kTileK;
  // Ranges of the reduction over N so that the grid fills the SMs once (the output has only K /
  // 128 row tiles: 64 for 28672 x 8192, 32 for 14336 x 4096), each at least kGradMinStepsPerRange
  // steps long; their fp32 partial sums are added in range order afterwards (deterministic).
  int64_t splits = tiles < sms ? sms / tiles : 1;
  if (splits > steps / kGradMinStepsPerRange) splits = steps / kGradMinStepsPerRange;
  if (splits < 1) splits = 1;
  plan.steps_per_split = (steps + splits - 1) / splits;
  plan.splits = (steps + plan.steps_per_split - 1) / plan.steps_per_split;
  plan.ctas = tiles * plan.splits;
  plan.workspace_bytes = plan.splits > 1 ? plan.splits * m * k * 4 : 0;
  return plan;
}

const char* launch_gemm_4bit_grad_x_wgmma(const Gemm4bitGradParams& p, const GradWgmmaPlan& plan,
                                          cudaStream_t stream) {
  if (plan.ctas >= (int64_t(1) << 31)) return "it takes fewer than 2^31 tiles";
  if (plan.splits > 1 && p.partial == nullptr) return "a grid cut over N needs a workspace";
  SsArgs a = weight_args(p, p.m);
  a.out_dim = int(p.k);
  a.red_steps = int((p.n + kTileK - 1) / kTileK);
  a.splits = int(plan.splits);
  a.steps_per_split = int(plan.steps_per_split);
  a.partial = p.partial;
  a.out = p.out;
  const char* error = p.kind == FloatKind::kBFloat16
                          ? launch_tokens<__nv_bfloat16, true>(p.dy, p.n, a, int(plan.tokens), stream)
                          : launch_tokens<__half, true>(p.dy, p.n, a, int(plan.tokens), stream);
  if (error != nullptr || plan.splits == 1) return error;
  launch_sum_splits(p.partial, p.out, p.kind, p.m * p.k, int(plan.splits), stream);
  return nullptr;
}

}  // namespace lowrank::gemm
