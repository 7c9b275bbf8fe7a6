// When may a kernel read its weights before griddepcontrol.wait? (gemm_4bit_skinny_tma.cu)
//
// A kernel launched with programmatic dependent launch may start while the previous kernel of the
// stream still runs, and that kernel's writes are visible only after the wait. Reading the weight
// before the wait (the TMA copies of the codes and the absmax while the previous call's last CTAs
// finish: 14336 x 4096 at M = 1 13.5 against 16.0 us in a chain of calls, docs/design.md) is safe
// only when nothing that may still be running writes the weight. Here that is decided exactly
// for one case: the stream is being captured into a graph and the one node the new launch will
// depend on is the previous skinny launch recorded for this capture, whose only global writes are
// its output (`written`), which does not overlap any weight range. That kernel waits for its own
// predecessor before it lets dependents launch, so everything before it is complete when the new
// kernel starts. Anything else (eager launches, where the host cannot know what was launched on
// the stream in between; a foreign node in between; a join of several branches) reads the weight
// after the wait. Eager launches at M <= 16 are host-bound anyway (~20 us of host time per call
// against ~16 us of device time on 14336 x 4096).
#pragma once
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include <cuda_runtime.h>

namespace lowrank::gemm::capture_chain {

struct ByteRange {
  uintptr_t begin = 0, end = 0;  // [begin, end)
  ByteRange() = default;
  ByteRange(const void* p, size_t bytes)
      : begin(reinterpret_cast<uintptr_t>(p)), end(reinterpret_cast<uintptr_t>(p) + (p == nullptr ? 0 : bytes)) {}
  bool overlaps(const ByteRange& o) const { return begin < o.end && o.begin < end; }
};

struct Launch {
  unsigned long long capture_id;
  cudaGraphNode_t node;
  ByteRange written;
};

inline std::mutex& records_mutex() {
  static std::mutex m;
  return m;
}
inline std::unordered_map<cudaStream_t, Launch>& records() {
  static std::unordered_map<cudaStream_t, Launch> r;
  return r;
}

// The capture's id and its single current dependency, or false (not capturing, several or no
// dependencies, or the query failed: then its error is cleared, as a refusal here is an answer).
inline bool single_dependency(cudaStream_t stream, unsigned long long* id, cudaGraphNode_t* node) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* deps = nullptr;
  size_t n_deps = 0;
  if (cudaStreamGetCaptureInfo(stream, &status, id, nullptr, &deps, nullptr, &n_deps) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (status != cudaStreamCaptureStatusActive || n_deps != 1) return false;
  *node = deps[0];
  return true;
}

// True when the next launch on `stream` depends on exactly the skinny launch recorded last for
// this capture and that launch wrote none of `reads`.
template <int N>
bool follows_own_launch(cudaStream_t stream, const ByteRange (&reads)[N]) {
  unsigned long long id = 0;
  cudaGraphNode_t node = nullptr;
  if (!single_dependency(stream, &id, &node)) return false;
  std::lock_guard<std::mutex> lock(records_mutex());
  const auto it = records().find(stream);
  if (it == records().end() || it->second.capture_id != id || it->second.node != node) return false;
  for (const ByteRange& r : reads)
    if (r.overlaps(it->second.written)) return false;
  return true;
}

// After a skinny launch: remember its node (while capturing) and what it writes.
inline void record_launch(cudaStream_t stream, ByteRange written) {
  unsigned long long id = 0;
  cudaGraphNode_t node = nullptr;
  const bool captured = single_dependency(stream, &id, &node);
  std::lock_guard<std::mutex> lock(records_mutex());
  if (captured) records()[stream] = Launch{id, node, written};
  else records().erase(stream);
}

}  // namespace lowrank::gemm::capture_chain
