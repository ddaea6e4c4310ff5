// grokcli's CPU int8 matmul: y[n] = x[n] @ (w[e_n] * scales[e_n]) for rows n with experts e_n.
//
// XLA:CPU converts int8 to float at ~6 GB/s on one thread and runs independent loops one after
// another; this kernel streams the int8 rows once, converts them into a small buffer that stays in
// L1, multiplies every row of x that uses the same expert against it, and shares the work between
// the threads of XLA's own intra-op pool. Plain C++ that the compiler vectorises (-O3
// -march=native): no intrinsics, so it builds wherever jax runs on a CPU.
//
// Shapes: x f32 [N, K]; w int8 [E, K, M]; scales f32 [E, B, M] (each of the B rows applies to one
// block of K/B consecutive input rows); experts int32 [N] (values in [0, E)); y f32 [N, M].

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileRows = 16;  // rows of x (same expert) sharing each converted weight strip
constexpr int64_t kColumns = 512;  // columns per task
constexpr int64_t kDepth = 16;     // input rows converted at a time: 16 x 512 f32 = 32 KiB, in L1
constexpr int64_t kLanes = 16;     // floats per vector (the compiler splits them where narrower)
constexpr int64_t kStrip = 2 * kLanes;  // columns of one micro-kernel step

typedef float f32x16 __attribute__((vector_size(kLanes * sizeof(float))));

struct Problem {
  const float* x;
  const int8_t* w;
  const float* scales;
  float* y;
  int64_t k, m, blocks;
  std::vector<int32_t> order;       // row indices sorted by expert
  std::vector<int64_t> tile_start;  // per tile of rows: first index into `order`
  std::vector<int64_t> tile_rows;   // per tile: number of rows (<= kTileRows)
  std::vector<int32_t> tile_expert;
  int64_t column_parts;
};

inline f32x16 Load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// out[r][0:width) += sum_d xs[r][d] * wf[d][0:width) for R rows, `depth` <= kDepth; the
// accumulators of R rows x kStrip columns stay in registers over the depth.
template <int R>
void MultiplyRows(const float (&xs)[kTileRows][kDepth], int64_t row0, const float (*wf)[kColumns],
                  int64_t depth, int64_t width, float (*out)[kColumns]) {
  for (int64_t c = 0; c < width; c += kStrip) {
    f32x16 acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = Load(out[row0 + r] + c);
      acc[r][1] = Load(out[row0 + r] + c + kLanes);
    }
    for (int64_t d = 0; d < depth; ++d) {
      const f32x16 w0 = Load(wf[d] + c), w1 = Load(wf[d] + c + kLanes);
      for (int r = 0; r < R; ++r) {
        const float xv = xs[row0 + r][d];
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      Store(out[row0 + r] + c, acc[r][0]);
      Store(out[row0 + r] + c + kLanes, acc[r][1]);
    }
  }
}

// One task: one tile of rows (one expert) times one strip of up to kColumns columns, over all of K.
void RunTask(const Problem& p, int64_t task) {
  const int64_t tile = task / p.column_parts;
  const int64_t c0 = (task % p.column_parts) * kColumns;
  const int64_t width = std::min(kColumns, p.m - c0);
  const int64_t padded = (width + kStrip - 1) / kStrip * kStrip;  // buffers are zero past `width`
  const int64_t rows = p.tile_rows[tile];
  const int32_t* order = p.order.data() + p.tile_start[tile];
  const int64_t e = p.tile_expert[tile];
  const int8_t* w = p.w + e * p.k * p.m + c0;
  const float* s = p.scales + e * p.blocks * p.m + c0;
  const int64_t block_rows = p.k / p.blocks;

  alignas(64) float acc[kTileRows][kColumns];
  alignas(64) float part[kTileRows][kColumns];
  alignas(64) float wf[kDepth][kColumns];
  alignas(64) float xs[kTileRows][kDepth];
  for (int64_t r = 0; r < rows; ++r) std::fill(acc[r], acc[r] + padded, 0.0f);
  if (padded != width)
    for (int64_t d = 0; d < kDepth; ++d) std::fill(wf[d] + width, wf[d] + padded, 0.0f);

  for (int64_t b = 0; b < p.blocks; ++b) {
    for (int64_t r = 0; r < rows; ++r) std::fill(part[r], part[r] + padded, 0.0f);
    const int64_t k_end = (b + 1) * block_rows;
    for (int64_t k = b * block_rows; k < k_end; k += kDepth) {
      const int64_t depth = std::min(kDepth, k_end - k);
      for (int64_t d = 0; d < depth; ++d) {  // int8 -> f32, one sequential read of each row
        const int8_t* src = w + (k + d) * p.m;
        float* __restrict__ dst = wf[d];
        for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<float>(src[c]);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < depth; ++d) xs[r][d] = p.x[order[r] * p.k + k + d];
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) MultiplyRows<4>(xs, r, wf, depth, padded, part);
      switch (rows - r) {
        case 3: MultiplyRows<3>(xs, r, wf, depth, padded, part); break;
        case 2: MultiplyRows<2>(xs, r, wf, depth, padded, part); break;
        case 1: MultiplyRows<1>(xs, r, wf, depth, padded, part); break;
        default: break;
      }
    }
    const float* sb = s + b * p.m;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) acc[r][c] += part[r][c] * sb[c];
  }
  for (int64_t r = 0; r < rows; ++r) std::memcpy(p.y + order[r] * p.m + c0, acc[r], width * sizeof(float));
}

// Work sharing: tasks are claimed from an atomic counter by the calling thread and by helpers
// scheduled on XLA's pool. The caller never waits for a helper that has not started (it runs the
// remaining tasks itself), so a busy or single-thread pool cannot deadlock it; state is shared
// so that a helper that starts after the call returned finds no tasks and touches nothing else.
struct Shared {
  Problem problem;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
};

void Work(Shared& s) {
  int64_t done = 0;
  for (int64_t t; (t = s.next.fetch_add(1, std::memory_order_relaxed)) < s.tasks;) {
    RunTask(s.problem, t);
    ++done;
  }
  if (done) s.finished.fetch_add(done, std::memory_order_acq_rel);
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::S32> experts,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3 || experts.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("grokcli_qmatmul: expected x [N,K], w [E,K,M], scales [E,B,M], experts [N]");
  const int64_t n = xd[0], k = xd[1], e = wd[0], m = wd[2], blocks = sd[1];
  if (wd[1] != k || sd[0] != e || sd[2] != m || blocks < 1 || k % blocks != 0 || experts.dimensions()[0] != n)
    return ffi::Error::InvalidArgument("grokcli_qmatmul: shapes do not agree");

  auto shared = std::make_shared<Shared>();
  Problem& p = shared->problem;
  p.x = x.typed_data();
  p.w = w.typed_data();
  p.scales = scales.typed_data();
  p.y = y->typed_data();
  p.k = k;
  p.m = m;
  p.blocks = blocks;
  p.column_parts = (m + kColumns - 1) / kColumns;

  // Counting sort of the rows by expert, then tiles of up to kTileRows rows per expert.
  const int32_t* ex = experts.typed_data();
  std::vector<int64_t> count(e + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (ex[i] < 0 || ex[i] >= e) return ffi::Error::InvalidArgument("grokcli_qmatmul: expert index out of range");
    ++count[ex[i] + 1];
  }
  for (int64_t i = 0; i < e; ++i) count[i + 1] += count[i];
  p.order.resize(n);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < n; ++i) p.order[fill[ex[i]]++] = static_cast<int32_t>(i);
  for (int64_t i = 0; i < e; ++i)
    for (int64_t r = count[i]; r < count[i + 1]; r += kTileRows) {
      p.tile_start.push_back(r);
      p.tile_rows.push_back(std::min(kTileRows, count[i + 1] - r));
      p.tile_expert.push_back(static_cast<int32_t>(i));
    }
  shared->tasks = static_cast<int64_t>(p.tile_start.size()) * p.column_parts;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Work(*shared); });
  Work(*shared);
  while (shared->finished.load(std::memory_order_acquire) < shared->tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokcliQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
