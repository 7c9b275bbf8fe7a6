// lowrank::mm_tuned on CUDA: a 16-bit GEMM through the cuBLASLt algorithm that measured fastest for
// its shape, chosen on the shape's first call.
//
// Why: torch.mm takes cuBLAS's first choice, and its ranking is a model, not a measurement. On the
// H100 (scripts/probe_cublaslt_algos.py, cuBLASLt 13.1, benchmarks/results/experiments/
// gemm_tuning_2026-11-24.txt) the LoRA layer's forward GEMM x W'^T at M = 8192, 14336 x 4096 ran
// 0.938-0.944x torch.mm's time with the heuristic's 7th algorithm, and that took the QLoRA layer step
// from 1.1045x to 1.0851x the bf16 floor (150 paired rounds). The heuristic's first algorithm was no
// faster than torch.mm there, so the choice has to be timed.
//
// The rule. A call takes the tuned path when a and b are float16/bfloat16 on CUDA, a's rows and b are
// contiguous, every pointer is 256-byte aligned (the alignment the heuristic assumes by default) and
// M N K >= kTuneMinMnk; others go to the plain matmul (mm_plain). A shape's first call outside CUDA
// graph capture times the heuristic's algorithms without split-K (so every output element is one
// fp32 sum over K in order, as cuBLAS's own kernels) and the plain matmul: kTuneWarmupCalls calls,
// then kTuneRounds rounds of one call each in a rotating order; it keeps the algorithm with the
// smallest median ratio of its time to the plain matmul's in the same round if that is below
// kTuneMargin, the plain matmul otherwise; later calls of that shape take the kept choice. At most
// kMaxTunedShapes shapes are timed per process (later ones take the plain matmul): a varying M would
// otherwise time every new M once. The choice is measured back to back on the machine at hand and
// can differ between H100s (power-capped GEMMs favour some tiles): the LoRA layer's gain was 1.9% of
// a step on one machine and none on another (docs/design.md).
// Switches, read per call: LOWRANK_GEMM_TUNE=0 always the plain matmul; LOWRANK_GEMM_ALGO=<i> the
// heuristic's algorithm i (no timing; for tests and A/B); LOWRANK_GEMM_TUNE_TRACE=1 prints each
// shape's timings and choice to stderr.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "gemm/gemm_checks.h"

namespace lowrank::gemm {
namespace {

// 2^34 multiply-adds: ~45 us of bf16 GEMM on the H100. The timing costs ~10 calls per candidate
// once; below this a shape's calls are short enough that launch time, not the algorithm, decides.
constexpr double kTuneMinMnk = 17179869184.0;
constexpr int kTuneWarmupCalls = 8;
constexpr int kTuneRounds = 9;
constexpr int kHeuristicCount = 16;
// An algorithm is kept only if its median time over the plain matmul's (per round) is below this.
// Timed back to back, the 14336 x 4096 backward's algorithms came within 1-3% of the plain matmul
// on the H100, and one chosen at a 1% margin ran 8% slower inside the layer step (1297 against
// 1202 us); the forward's kept algorithm measured 3-6% faster both ways.
constexpr double kTuneMargin = 0.98;
constexpr int kMaxTunedShapes = 64;
// The algorithms kept for these shapes asked for 4 bytes; 1 MiB bounds what a call adds to memory.
constexpr size_t kMaxWorkspace = size_t(1) << 20;
constexpr uintptr_t kAlign = 256;

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "lowrank::mm_tuned: cuBLASLt ", what, " failed with status ",
              num(int64_t(status)));
}

bool env_is(const char* name, char value) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == value;
}

// One problem's cuBLASLt descriptors: D [N, M] column-major (the row-major [M, N] output) =
// op(A) B, A = b as stored ([K, N] column-major, transposed, for transpose_b; [N, K] otherwise), B = a
// ([K, M] column-major), bias per row of D.
struct LtProblem {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a_layout = nullptr, b_layout = nullptr, d_layout = nullptr;

  LtProblem(int64_t m, int64_t n, int64_t k, bool transpose_b, at::ScalarType dtype, const void* bias) {
    const cudaDataType_t type = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
    check_lt(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    const cublasOperation_t trans_a = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t trans_b = CUBLAS_OP_N;
    check_lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), "TRANSA");
    check_lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)), "TRANSB");
    if (bias != nullptr) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      check_lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
               "EPILOGUE");
      check_lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
               "BIAS_POINTER");
    }
    if (transpose_b) {
      check_lt(cublasLtMatrixLayoutCreate(&a_layout, type, k, n, k), "layout of b");
    } else {
      check_lt(cublasLtMatrixLayoutCreate(&a_layout, type, n, k, n), "layout of b");
    }
    check_lt(cublasLtMatrixLayoutCreate(&b_layout, type, k, m, k), "layout of a");
    check_lt(cublasLtMatrixLayoutCreate(&d_layout, type, n, m, n), "layout of the output");
  }
  ~LtProblem() {
    if (d_layout) cublasLtMatrixLayoutDestroy(d_layout);
    if (b_layout) cublasLtMatrixLayoutDestroy(b_layout);
    if (a_layout) cublasLtMatrixLayoutDestroy(a_layout);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
  LtProblem(const LtProblem&) = delete;
  LtProblem& operator=(const LtProblem&) = delete;

  // The heuristic's algorithms for this problem without split-K, in its order.
  std::vector<cublasLtMatmulHeuristicResult_t> algorithms(cublasLtHandle_t handle) const {
    cublasLtMatmulPreference_t pref = nullptr;
    check_lt(cublasLtMatmulPreferenceCreate(&pref), "MatmulPreferenceCreate");
    const uint64_t workspace = kMaxWorkspace;
    cublasStatus_t status =
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
    cublasLtMatmulHeuristicResult_t results[kHeuristicCount] = {};
    int count = 0;
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, d_layout, d_layout, pref,
                                              kHeuristicCount, results, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    std::vector<cublasLtMatmulHeuristicResult_t> kept;
    if (status != CUBLAS_STATUS_SUCCESS) return kept;  // no algorithm: the plain matmul
    for (int i = 0; i < count; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
      uint32_t split_k = 1;
      size_t written = 0;
      if (cublasLtMatmulAlgoConfigGetAttribute(&results[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_k,
                                               sizeof(split_k), &written) == CUBLAS_STATUS_SUCCESS &&
          split_k > 1)
        continue;
      kept.push_back(results[i]);
    }
    return kept;
  }

  void run(cublasLtHandle_t handle, const cublasLtMatmulHeuristicResult_t& algo, const at::Tensor& a,
           const at::Tensor& b, at::Tensor& out, cudaStream_t stream) const {
    const float one = 1.0f, zero = 0.0f;
    at::Tensor workspace;
    if (algo.workspaceSize > 0)
      workspace = at::empty({int64_t(algo.workspaceSize)}, a.options().dtype(at::kByte));
    check_lt(cublasLtMatmul(handle, desc, &one, b.const_data_ptr(), a_layout, a.const_data_ptr(), b_layout, &zero,
                            out.mutable_data_ptr(), d_layout, out.mutable_data_ptr(), d_layout, &algo.algo,
                            algo.workspaceSize > 0 ? workspace.mutable_data_ptr() : nullptr, algo.workspaceSize,
                            stream),
             "Matmul");
  }
};

// (device, dtype, M, N, K, transpose_b, bias)
using ShapeKey = std::tuple<int, int, int64_t, int64_t, int64_t, bool, bool>;

struct Choice {
  bool plain = true;
  cublasLtMatmulHeuristicResult_t algo{};
};

std::mutex g_mutex;
std::map<ShapeKey, Choice> g_choices;

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlign == 0; }

// The plain matmul written into `out` [M, N] (the out= forms of mm_plain's calls: the same cuBLAS
// kernels, no allocation).
void plain_into(at::Tensor& out, const at::Tensor& a2, const at::Tensor& b, bool transpose_b,
                const std::optional<at::Tensor>& bias) {
  const at::Tensor bt = transpose_b ? b.t() : b;
  if (bias.has_value())
    at::addmm_out(out, *bias, a2, bt);
  else
    at::mm_out(out, a2, bt);
}

// Times the candidates on `stream` (the call's own output as their scratch) and returns the choice.
Choice tune(cublasLtHandle_t handle, const LtProblem& problem, const std::vector<cublasLtMatmulHeuristicResult_t>& algos,
            const at::Tensor& a2, const at::Tensor& b, bool transpose_b, const std::optional<at::Tensor>& bias,
            at::Tensor& out, cudaStream_t stream, const ShapeKey& key) {
  const int n_cand = int(algos.size()) + 1;  // the last candidate is the plain matmul
  // The plain matmul writes into the call's output as well (the out= form of what mm_plain calls, the
  // same cuBLAS kernels): timing allocates nothing, so the first call's peak memory is a later one's.
  auto launch = [&](int c) {
    if (c != n_cand - 1)
      problem.run(handle, algos[size_t(c)], a2, b, out, stream);
    else
      plain_into(out, a2, b, transpose_b, bias);
  };
  // Warm-up: module loads, and the clock and power state of back-to-back GEMMs (from an idle GPU the
  // first milliseconds run at lower clocks).
  for (int i = 0; i < kTuneWarmupCalls; ++i) launch(n_cand - 1);
  for (int c = 0; c < n_cand; ++c) launch(c);
  std::vector<cudaEvent_t> events(size_t(2 * n_cand * kTuneRounds));
  for (auto& e : events) C10_CUDA_CHECK(cudaEventCreate(&e));
  auto event = [&](int r, int c, int end) { return events[size_t(2 * (r * n_cand + c) + end)]; };
  for (int r = 0; r < kTuneRounds; ++r) {
    for (int i = 0; i < n_cand; ++i) {
      const int c = (i + r) % n_cand;  // every candidate in every position of a round once in n_cand rounds
      C10_CUDA_CHECK(cudaEventRecord(event(r, c, 0), stream));
      launch(c);
      C10_CUDA_CHECK(cudaEventRecord(event(r, c, 1), stream));
    }
  }
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  // per candidate: the median over rounds of its time over the plain matmul's in the same round
  std::vector<double> ratio(static_cast<size_t>(n_cand), 1.0), us(static_cast<size_t>(n_cand), 0.0);
  for (int c = 0; c < n_cand; ++c) {
    std::vector<double> q, t;
    for (int r = 0; r < kTuneRounds; ++r) {
      float ms = 0.f, plain_ms = 0.f;
      C10_CUDA_CHECK(cudaEventElapsedTime(&ms, event(r, c, 0), event(r, c, 1)));
      C10_CUDA_CHECK(cudaEventElapsedTime(&plain_ms, event(r, n_cand - 1, 0), event(r, n_cand - 1, 1)));
      q.push_back(double(ms) / double(plain_ms));
      t.push_back(1000.0 * ms);
    }
    std::nth_element(q.begin(), q.begin() + kTuneRounds / 2, q.end());
    std::nth_element(t.begin(), t.begin() + kTuneRounds / 2, t.end());
    ratio[size_t(c)] = q[kTuneRounds / 2];
    us[size_t(c)] = t[kTuneRounds / 2];
  }
  for (auto& e : events) cudaEventDestroy(e);
  int best = n_cand - 1;
  for (int c = 0; c < n_cand - 1; ++c)
    if (ratio[size_t(c)] < ratio[size_t(best)]) best = c;
  Choice choice;
  if (best != n_cand - 1 && ratio[size_t(best)] < kTuneMargin) {
    choice.plain = false;
    choice.algo = algos[size_t(best)];
  }
  if (env_is("LOWRANK_GEMM_TUNE_TRACE", '1')) {
    std::fprintf(stderr, "lowrank::mm_tuned: M=%lld N=%lld K=%lld %s%s: us per call", (long long)std::get<2>(key),
                 (long long)std::get<3>(key), (long long)std::get<4>(key), transpose_b ? "a b^T" : "a b",
                 std::get<6>(key) ? " + bias" : "");
    for (int c = 0; c < n_cand; ++c)
      std::fprintf(stderr, " %s%d=%.1f (%.3f)", c == n_cand - 1 ? "plain" : "algo", c == n_cand - 1 ? 0 : c,
                   us[size_t(c)], ratio[size_t(c)]);
    std::fprintf(stderr, " -> %s\n", choice.plain ? "plain" : ("algo" + std::to_string(best)).c_str());
  }
  return choice;
}

at::Tensor mm_tuned_cuda(const at::Tensor& a, const at::Tensor& b, bool transpose_b,
                         const std::optional<at::Tensor>& bias) {
  check_mm_tuned(a, b, transpose_b, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t k = a.size(-1);
  const int64_t n = transpose_b ? b.size(0) : b.size(1);
  const int64_t m = k > 0 ? a.numel() / k : 0;
  const bool half = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
  const char* forced = std::getenv("LOWRANK_GEMM_ALGO");
  const bool want = half && m > 0 && n > 0 && k > 0 && !env_is("LOWRANK_GEMM_TUNE", '0') &&
                    (forced != nullptr || double(m) * double(n) * double(k) >= kTuneMinMnk);
  if (!want) return mm_plain(a, b, transpose_b, bias);
  const at::Tensor a2 = a.reshape({m, k});
  if (!a2.is_contiguous() || !b.is_contiguous() || !aligned(a2.const_data_ptr()) || !aligned(b.const_data_ptr()) ||
      (bias.has_value() && (!bias->is_contiguous() || !aligned(bias->const_data_ptr()))) ||
      m >= (int64_t(1) << 31) || n >= (int64_t(1) << 31) || k >= (int64_t(1) << 31))
    return mm_plain(a, b, transpose_b, bias);

  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = n;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const void* bias_ptr = bias.has_value() ? bias->const_data_ptr() : nullptr;

  if (forced != nullptr) {  // the heuristic's algorithm i, no timing (tests, A/B)
    cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
    const LtProblem problem(m, n, k, transpose_b, a.scalar_type(), bias_ptr);
    const int index = std::atoi(forced);
    const auto algos = problem.algorithms(handle);
    // (numbers go into messages as strings: quant_checks.h says why)
    TORCH_CHECK(index >= 0 && index < int(algos.size()), "lowrank::mm_tuned: LOWRANK_GEMM_ALGO=", forced,
                " but cuBLASLt offers ", num(int64_t(algos.size())), " algorithms without split-K for this shape (0 .. ",
                num(int64_t(algos.size()) - 1), ")");
    at::Tensor out = at::empty({m, n}, a.options());
    problem.run(handle, algos[size_t(index)], a2, b, out, stream);
    return out.view(out_shape);
  }

  // The output is allocated only where this function writes it (a kept plain matmul allocates its
  // own: an [M, N] allocated before the choice was known stayed alive beside it, +64 MB at the
  // LoRA layer's dX).
  const ShapeKey key{a.device().index(), int(a.scalar_type()), m, n, k, transpose_b, bias.has_value()};
  std::unique_lock<std::mutex> lock(g_mutex);
  auto it = g_choices.find(key);
  if (it != g_choices.end()) {
    const Choice choice = it->second;
    lock.unlock();
    if (choice.plain) return mm_plain(a, b, transpose_b, bias);
    const LtProblem problem(m, n, k, transpose_b, a.scalar_type(), bias_ptr);
    at::Tensor out = at::empty({m, n}, a.options());
    problem.run(at::cuda::getCurrentCUDABlasLtHandle(), choice.algo, a2, b, out, stream);
    return out.view(out_shape);
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // no timing inside a graph capture (events cannot be waited for there), nor past the cap
  if (capture != cudaStreamCaptureStatusNone || int(g_choices.size()) >= kMaxTunedShapes) {
    lock.unlock();
    return mm_plain(a, b, transpose_b, bias);
  }
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const LtProblem problem(m, n, k, transpose_b, a.scalar_type(), bias_ptr);
  const auto algos = problem.algorithms(handle);
  at::Tensor out = at::empty({m, n}, a.options());  // the timing's scratch, then this call's output
  Choice choice;
  if (!algos.empty()) choice = tune(handle, problem, algos, a2, b, transpose_b, bias, out, stream, key);
  g_choices.emplace(key, choice);
  lock.unlock();
  if (choice.plain)
    plain_into(out, a2, b, transpose_b, bias);
  else
    problem.run(handle, choice.algo, a2, b, out, stream);
  return out.view(out_shape);
}

}  // namespace
}  // namespace lowrank::gemm

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("mm_tuned", &lowrank::gemm::mm_tuned_cuda); }
