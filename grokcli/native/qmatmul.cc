// grokcli's CPU int8 matmul: y[n] = x[n] @ (w[e_n] * scales[e_n]) for rows n with experts e_n.
//
// XLA:CPU converts int8 to float at ~6 GB/s on one thread and runs independent loops one after
// another; this kernel streams the int8 rows once and shares the work between the threads of
// XLA's own intra-op pool. Rows of x are grouped by expert into tiles. A tile of one or two rows
// (decode) converts the weights in registers as they stream, over 1024-column strips (and, when
// there are too few strips for the threads, slices of K whose sums are added at the end); a larger
// tile (prefill) converts 16 weight rows at a time into a buffer that stays in L1 and multiplies
// every row of the tile against it. Plain C++ vector types sized to the target (AVX-512, AVX2,
// NEON or scalar), intrinsics only for the int8 widening, so it builds wherever jax runs on a CPU.
//
// Shapes: x f32 [N, K]; w int8 [E, K, M]; scales f32 [E, B, M] (each of the B rows applies to one
// block of K/B consecutive input rows); experts int32 [N] (values in [0, E)); y f32 [N, M].

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vector width of the target: 16 floats with AVX-512, 8 with AVX/AVX2, 4 elsewhere (NEON, SSE).
// The micro-kernels keep 2 vectors x up to 4 rows of accumulators in registers; with 16-float
// vectors on an AVX2 machine (16 registers of 8 floats) those spilled, which made prefill 9x
// slower than the XLA loops there.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
constexpr int64_t kTileRows = 16;  // rows of x (same expert) sharing each converted weight strip
constexpr int64_t kColumns = 512;  // columns per task when rows share converted strips
constexpr int64_t kGemvColumns = 1024;  // columns per task when every tile has <= kGemvRows rows
constexpr int64_t kGemvRows = 2;   // tiles this small convert in registers (nothing to share)
constexpr int64_t kDepth = 16;     // input rows converted at a time: 16 x 512 f32 = 32 KiB, in L1
constexpr int64_t kGemvDepth = 8;  // weight rows streamed at once by the register path
constexpr int64_t kMinSliceRows = 256;  // K slices for more parallelism are at least this deep
constexpr int64_t kStrip = 2 * kLanes;  // columns of one micro-kernel step
constexpr int64_t kMaxColumns = kGemvColumns > kColumns ? kGemvColumns : kColumns;

typedef float f32xN __attribute__((vector_size(kLanes * sizeof(float))));

struct Problem {
  const float* x;
  const int8_t* w;
  const float* scales;
  float* y;
  int64_t k, m, blocks, y_rows;
  std::vector<int32_t> order;       // row indices sorted by expert
  std::vector<int64_t> tile_start;  // per tile of rows: first index into `order`
  std::vector<int64_t> tile_rows;   // per tile: number of rows (<= kTileRows)
  std::vector<int32_t> tile_expert;
  int64_t column_parts, columns;  // column strips per tile, columns per strip
  int64_t k_parts = 1, k_rows = 0;  // slices of K per strip (rows each): > 1 when strips are too few
  float* partial = nullptr;  // k_parts > 1: [k_parts][N][M] partial sums, added up at the end
};

inline f32xN Load(const float* p) {
  f32xN v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, f32xN v) { std::memcpy(p, &v, sizeof v); }

// kLanes int8 -> float. GCC 12 scalarises __builtin_convertvector from int8 vectors (one
// vcvtsi2ss per element), so the widening uses the ISA's own instructions where it has them.
inline f32xN LoadInt8(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32xN)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (f32xN)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(__ARM_NEON) && defined(__aarch64__)
  int32_t four;
  std::memcpy(&four, p, sizeof four);
  const int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return (f32xN)vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
#else
  f32xN v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The register path for tiles of R <= kGemvRows rows (decode): out[r][0:width) += sum_d xs[r][d] *
// w[d][0:width), the int8 rows converted in registers as they stream (no staging buffer: with
// one or two rows of x there is nothing to share it with). `width` is a multiple of kStrip;
// columns past the matrix's edge are read from `tail` (zero-padded copies).
template <int R>
void StreamRows(const float (&xs)[kTileRows][kDepth], const int8_t* const* rows, int64_t depth, int64_t width,
                float (*out)[kMaxColumns]) {
  for (int64_t c = 0; c < width; c += kStrip) {
    f32xN acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = Load(out[r] + c);
      acc[r][1] = Load(out[r] + c + kLanes);
    }
    for (int64_t d = 0; d < depth; ++d) {
      const f32xN w0 = LoadInt8(rows[d] + c), w1 = LoadInt8(rows[d] + c + kLanes);
      for (int r = 0; r < R; ++r) {
        const float xv = xs[r][d];
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      Store(out[r] + c, acc[r][0]);
      Store(out[r] + c + kLanes, acc[r][1]);
    }
  }
}

// out[r][0:width) += sum_d xs[r][d] * wf[d][0:width) for R rows, `depth` <= kDepth; the
// accumulators of R rows x kStrip columns stay in registers over the depth.
template <int R>
void MultiplyRows(const float (&xs)[kTileRows][kDepth], int64_t row0, const float (*wf)[kMaxColumns],
                  int64_t depth, int64_t width, float (*out)[kMaxColumns]) {
  for (int64_t c = 0; c < width; c += kStrip) {
    f32xN acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = Load(out[row0 + r] + c);
      acc[r][1] = Load(out[row0 + r] + c + kLanes);
    }
    for (int64_t d = 0; d < depth; ++d) {
      const f32xN w0 = Load(wf[d] + c), w1 = Load(wf[d] + c + kLanes);
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

// One task: one tile of rows (one expert) times one strip of up to p.columns columns, over all of K.
void RunTask(const Problem& p, int64_t task) {
  const int64_t kp = task % p.k_parts;
  const int64_t tile = task / p.k_parts / p.column_parts;
  const int64_t c0 = (task / p.k_parts % p.column_parts) * p.columns;
  const int64_t k_lo = kp * p.k_rows, k_hi = std::min(p.k, k_lo + p.k_rows);
  const int64_t width = std::min(p.columns, p.m - c0);
  const int64_t padded = (width + kStrip - 1) / kStrip * kStrip;  // buffers are zero past `width`
  const int64_t rows = p.tile_rows[tile];
  const int32_t* order = p.order.data() + p.tile_start[tile];
  const int64_t e = p.tile_expert[tile];
  const int8_t* w = p.w + e * p.k * p.m + c0;
  const float* s = p.scales + e * p.blocks * p.m + c0;
  const int64_t block_rows = p.k / p.blocks;
  const bool stream = rows <= kGemvRows;

  alignas(64) float acc[kTileRows][kMaxColumns];
  alignas(64) float part[kTileRows][kMaxColumns];
  alignas(64) float wf[kDepth][kMaxColumns];
  alignas(64) float xs[kTileRows][kDepth];
  // The register path reads whole strips: a ragged last strip comes from zero-padded copies.
  alignas(64) int8_t tail[kGemvDepth][kStrip];
  const int64_t full = stream ? width / kStrip * kStrip : width;
  for (int64_t r = 0; r < rows; ++r) std::fill(acc[r], acc[r] + padded, 0.0f);
  if (!stream && padded != width)
    for (int64_t d = 0; d < kDepth; ++d) std::fill(wf[d] + width, wf[d] + padded, 0.0f);

  for (int64_t b = k_lo / block_rows; b * block_rows < k_hi; ++b) {
    for (int64_t r = 0; r < rows; ++r) std::fill(part[r], part[r] + padded, 0.0f);
    const int64_t k_end = std::min((b + 1) * block_rows, k_hi);
    const int64_t step = stream ? kGemvDepth : kDepth;
    for (int64_t k = std::max(b * block_rows, k_lo); k < k_end; k += step) {
      const int64_t depth = std::min(step, k_end - k);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < depth; ++d) xs[r][d] = p.x[order[r] * p.k + k + d];
      if (stream) {
        const int8_t* src[kGemvDepth];
        for (int64_t d = 0; d < depth; ++d) src[d] = w + (k + d) * p.m;
        if (rows == 1) StreamRows<1>(xs, src, depth, full, part);
        else StreamRows<2>(xs, src, depth, full, part);
        if (full != padded) {  // the ragged strip, through zero-padded copies
          const int8_t* padded_src[kGemvDepth];
          for (int64_t d = 0; d < depth; ++d) {
            std::fill(tail[d], tail[d] + kStrip, int8_t{0});
            std::memcpy(tail[d], src[d] + full, width - full);
            padded_src[d] = tail[d];
          }
          alignas(64) float strip[kGemvRows][kMaxColumns];
          for (int64_t r = 0; r < rows; ++r) std::memcpy(strip[r], part[r] + full, kStrip * sizeof(float));
          if (rows == 1) StreamRows<1>(xs, padded_src, depth, kStrip, strip);
          else StreamRows<2>(xs, padded_src, depth, kStrip, strip);
          for (int64_t r = 0; r < rows; ++r) std::memcpy(part[r] + full, strip[r], kStrip * sizeof(float));
        }
        continue;
      }
      for (int64_t d = 0; d < depth; ++d) {  // int8 -> f32, one sequential read of each row
        const int8_t* src = w + (k + d) * p.m;
        float* __restrict__ dst = wf[d];
        for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<float>(src[c]);
      }
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
  float* out = p.k_parts > 1 ? p.partial + kp * (p.y_rows * p.m) : p.y;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + order[r] * p.m + c0, acc[r], width * sizeof(float));
}

// Work sharing: tasks are claimed from an atomic counter by the calling thread and by helpers
// scheduled on XLA's pool. The caller never waits for a helper that has not started (it runs the
// remaining tasks itself), so a busy or single-thread pool cannot deadlock it; state is shared
// so that a helper that starts after the call returned finds no tasks and touches nothing else.
// When the caller has run out of tasks it sleeps on a condition variable until the helpers'
// claimed tasks are done: a spinning caller would hold the CPU that a preempted helper needs on
// a busy machine (both vCPUs look busy, so the scheduler does not move the helper over).
struct Shared {
  Problem problem;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable done;
  std::vector<float> scratch;  // the partial sums of K slices
};

void Work(Shared& s, bool notify) {
  int64_t done = 0;
  for (int64_t t; (t = s.next.fetch_add(1, std::memory_order_relaxed)) < s.tasks;) {
    RunTask(s.problem, t);
    ++done;
  }
  if (done && s.finished.fetch_add(done, std::memory_order_acq_rel) + done == s.tasks && notify) {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.done.notify_all();
  }
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
  p.y_rows = n;

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
  // Decode (every tile of one or two rows) streams in registers: wider tasks read longer runs
  // of each weight row, which the hardware prefetchers follow better.
  const bool all_small = std::all_of(p.tile_rows.begin(), p.tile_rows.end(), [](int64_t r) { return r <= kGemvRows; });
  p.columns = all_small ? kGemvColumns : kColumns;
  p.column_parts = (m + p.columns - 1) / p.columns;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t strips = static_cast<int64_t>(p.tile_start.size()) * p.column_parts;
  // Too few strips to keep every thread streaming (a narrow matrix, or a many-core machine):
  // slice K too, each slice at least kMinSliceRows deep, and add the slices' sums at the end.
  // Only for decode-sized calls, where the partial sums are small next to the weights.
  if (all_small && strips > 0 && strips < 4 * threads) {
    p.k_parts = std::min((4 * threads + strips - 1) / strips, std::max<int64_t>(1, k / kMinSliceRows));
    p.k_rows = (k + p.k_parts - 1) / p.k_parts;
    p.k_rows = (p.k_rows + kGemvDepth - 1) / kGemvDepth * kGemvDepth;
    p.k_parts = (k + p.k_rows - 1) / p.k_rows;
  }
  if (p.k_parts <= 1) p.k_parts = 1, p.k_rows = k;
  if (p.k_parts > 1) {
    shared->scratch.resize(static_cast<size_t>(p.k_parts * n * m));
    p.partial = shared->scratch.data();
  }
  shared->tasks = strips * p.k_parts;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Work(*shared, true); });
  Work(*shared, false);
  if (shared->finished.load(std::memory_order_acquire) < shared->tasks) {
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->done.wait(lock, [&] { return shared->finished.load(std::memory_order_acquire) == shared->tasks; });
  }
  if (p.k_parts > 1) {  // y = the sum of the K slices (every row of y was written by each slice)
    float* __restrict__ yv = p.y;
    const int64_t size = n * m;
    std::memcpy(yv, p.partial, size * sizeof(float));
    for (int64_t kp = 1; kp < p.k_parts; ++kp) {
      const float* __restrict__ src = p.partial + kp * size;
      for (int64_t i = 0; i < size; ++i) yv[i] += src[i];
    }
  }
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
