// The sampled dense-dense product on the CPU, as an XLA FFI custom call.
//
//   out[j] = sum_t x[t, a[j]] * dy[t, b[j]]        (float32 products and sums)
//
// for the k active entries (a[j], b[j]) of an [in, out] weight, with x [T, in] and
// dy [T, out] token-major (as the layer sees them; no transposed copy is made) in
// float32 or bfloat16. Built on first use by sparsejax.kernels.cpu_sampled_product.
//
// Plan. Of the two operands, the "major" one has more columns; the entries are
// counting-sorted by their major column, so that consecutive entries share it. The
// tokens are walked in tiles of `tile` tokens, small enough that the tile of the
// "minor" operand, transposed into a [minor_cols, tile] buffer, stays in L2. Per
// tile, each entry costs one vectorized dot of `tile` products: its major column is a
// row of a [16, tile] buffer into which the block of 16 major columns holding it was
// transposed (once per block, as the sorted entries reach it), its minor column a row
// of the transposed minor tile. The sorted entries are split into
// contiguous parts, run on XLA's intra-op thread pool; the calling thread works too.
//
// Each entry's sum is formed by one thread in a fixed order (tiles in order, a dot per
// tile), so the result does not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinorBudgetBytes = 1 << 20;  // the transposed minor tile (in L2)
constexpr int64_t kMaxTile = 256;
constexpr int64_t kMinTile = 16;
constexpr int64_t kMinEntriesPerPart = 2048;

inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

typedef float Lanes __attribute__((vector_size(64)));  // 16 float32 lanes

inline Lanes LoadLanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// sum_t u[t] * v[t] for n a multiple of 16: four independent 16-lane accumulators
// (so consecutive multiply-adds do not wait on each other), summed in a fixed order.
inline float Dot(const float* __restrict u, const float* __restrict v, int64_t n) {
  Lanes acc[4] = {};
  int64_t t = 0;
  for (; t + 64 <= n; t += 64) {
    for (int i = 0; i < 4; ++i) acc[i] += LoadLanes(u + t + 16 * i) * LoadLanes(v + t + 16 * i);
  }
  for (int i = 0; t < n; t += 16, ++i) acc[i] += LoadLanes(u + t) * LoadLanes(v + t);
  const Lanes total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += total[i];
  return s;
}

// Entries sorted by their major column: major/minor column and original position.
struct SortedEntries {
  std::vector<int32_t> major, minor, position;
};

template <typename TMajor, typename TMinor>
struct Problem {
  const TMajor* major;  // [T, major_cols]
  const TMinor* minor;  // [T, minor_cols]
  int64_t tokens, major_cols, minor_cols, tile;
  const SortedEntries* entries;
  float* sums;  // [k], sorted order
};

constexpr int64_t kBlockCols = 16;  // one 64-byte line of float32 columns
constexpr int64_t kPrefetchCols = 2 * kBlockCols;

#if defined(__AVX512F__)
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {  // bfloat16 bits -> float32
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// In place: r[j] lane i becomes r[i] lane j (a 16 x 16 float32 transpose in registers).
inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16], v[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      v[8 * h + i] = _mm512_shuffle_f32x4(u[8 * h + i], u[8 * h + 4 + i], 0x88);
      v[8 * h + 4 + i] = _mm512_shuffle_f32x4(u[8 * h + i], u[8 * h + 4 + i], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(v[i], v[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(v[i], v[8 + i], 0xDD);
  }
}
#endif

// dst[c * tile + t] = src[t * ld + c0 + c] for c < cols, t < n; zeros for n <= t < padded.
// With AVX-512, a full block of 16 columns moves 16 rows at a time through a register
// transpose; otherwise (and for the ragged rest) four rows at a time.
template <typename T>
void TransposeColumns(const T* src, int64_t ld, int64_t c0, int64_t cols, int64_t n,
                      int64_t padded, int64_t tile, float* dst) {
  int64_t t = 0;
#if defined(__AVX512F__)
  if (cols == kBlockCols) {
    __m512 r[16];
    // The rows are far apart (no hardware prefetcher follows them); the caller walks
    // the blocks left to right, so ask for the block after next now.
    const bool ahead = c0 + kPrefetchCols < ld;
    for (; t + 16 <= n; t += 16) {
      for (int i = 0; i < 16; ++i) {
        const T* row = src + (t + i) * ld + c0;
        r[i] = Load16(row);
        if (ahead) __builtin_prefetch(row + kPrefetchCols);
      }
      Transpose16x16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * tile + t, r[c]);
    }
  }
#endif
  for (; t + 4 <= n; t += 4) {
    const T* r0 = src + t * ld + c0;
    for (int64_t c = 0; c < cols; ++c) {
      float* d = dst + c * tile + t;
      d[0] = ToF32(r0[c]);
      d[1] = ToF32(r0[ld + c]);
      d[2] = ToF32(r0[2 * ld + c]);
      d[3] = ToF32(r0[3 * ld + c]);
    }
  }
  for (; t < n; ++t) {
    for (int64_t c = 0; c < cols; ++c) dst[c * tile + t] = ToF32(src[t * ld + c0 + c]);
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t u = n; u < padded; ++u) dst[c * tile + u] = 0.0f;
  }
}

template <typename TMajor, typename TMinor>
void RunPart(const Problem<TMajor, TMinor>& p, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const int64_t tile = p.tile;
  std::vector<float> minor_t(static_cast<size_t>(p.minor_cols * tile));
  std::vector<float> major_t(static_cast<size_t>(kBlockCols * tile));
  const int32_t* maj = p.entries->major.data();
  const int32_t* mnr = p.entries->minor.data();
  for (int64_t t0 = 0; t0 < p.tokens; t0 += tile) {
    const int64_t n = std::min(tile, p.tokens - t0);
    const int64_t padded = (n + kMinTile - 1) / kMinTile * kMinTile;
    // The minor tile, transposed: minor_t[c * tile + t] = minor[t0 + t, c].
    const TMinor* msrc = p.minor + t0 * p.minor_cols;
    for (int64_t c0 = 0; c0 < p.minor_cols; c0 += kBlockCols) {
      TransposeColumns(msrc, p.minor_cols, c0, std::min(kBlockCols, p.minor_cols - c0), n,
                       padded, tile, minor_t.data() + c0 * tile);
    }
    // The major tile, transposed one block of columns at a time, as the sorted
    // entries reach it.
    const TMajor* Msrc = p.major + t0 * p.major_cols;
    int64_t block = -1;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t col = maj[j];
      if (col / kBlockCols != block) {
        block = col / kBlockCols;
        const int64_t c0 = block * kBlockCols;
        TransposeColumns(Msrc, p.major_cols, c0, std::min(kBlockCols, p.major_cols - c0),
                         n, padded, tile, major_t.data());
      }
      p.sums[j] += Dot(major_t.data() + (col % kBlockCols) * tile,
                       minor_t.data() + mnr[j] * tile, padded);
    }
  }
}

// Runs parts [0, num_parts) on the pool and on the calling thread. A part is claimed
// through a shared counter, so the caller never waits for a task that has not started
// (no deadlock when the pool is busy); a task that starts late finds nothing to do.
template <typename F>
void ParallelParts(ffi::ThreadPool& pool, int64_t num_parts, F run) {
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, num_parts, &run]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < num_parts;) {
      run(i);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == num_parts) shared->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(num_parts - 1, pool.num_threads());
  for (int64_t h = 0; h < helpers; ++h) {
    // `run` is only touched for a claimed part, and every claimed part finishes before
    // the caller returns, so the reference stays valid.
    pool.Schedule([work]() { work(); });
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == num_parts; });
}

template <typename TMajor, typename TMinor>
void Solve(ffi::ThreadPool& pool, const TMajor* major, const TMinor* minor, int64_t tokens,
           int64_t major_cols, int64_t minor_cols, const SortedEntries& entries,
           float* out) {
  const int64_t k = static_cast<int64_t>(entries.major.size());
  int64_t tile = kMaxTile;
  while (tile > kMinTile && minor_cols * tile * 4 > kMinorBudgetBytes) tile /= 2;
  std::vector<float> sums(static_cast<size_t>(k), 0.0f);
  Problem<TMajor, TMinor> p{major, minor, tokens, major_cols, minor_cols, tile, &entries,
                            sums.data()};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min(threads, k / kMinEntriesPerPart));
  ParallelParts(pool, parts, [&](int64_t i) {
    RunPart(p, k * i / parts, k * (i + 1) / parts);
  });
  for (int64_t j = 0; j < k; ++j) out[entries.position[j]] = sums[j];
}

// Counting sort of the entries by major column; false if a coordinate is out of range.
bool SortEntries(const int32_t* major, const int32_t* minor, int64_t k, int64_t major_cols,
                 int64_t minor_cols, SortedEntries* sorted) {
  std::vector<int64_t> start(static_cast<size_t>(major_cols + 1), 0);
  for (int64_t j = 0; j < k; ++j) {
    if (major[j] < 0 || major[j] >= major_cols || minor[j] < 0 || minor[j] >= minor_cols) {
      return false;
    }
    ++start[major[j] + 1];
  }
  for (int64_t c = 0; c < major_cols; ++c) start[c + 1] += start[c];
  sorted->major.resize(k);
  sorted->minor.resize(k);
  sorted->position.resize(k);
  for (int64_t j = 0; j < k; ++j) {  // stable: equal columns keep their order
    const int64_t s = start[major[j]]++;
    sorted->major[s] = major[j];
    sorted->minor[s] = minor[j];
    sorted->position[s] = static_cast<int32_t>(j);
  }
  return true;
}

template <typename TX, typename TD>
void Dispatch(ffi::ThreadPool& pool, const void* x, const void* dy, int64_t tokens,
              int64_t in, int64_t out_cols, const SortedEntries& entries, bool dy_major,
              float* out) {
  const auto* xs = static_cast<const TX*>(x);
  const auto* ds = static_cast<const TD*>(dy);
  if (dy_major) {
    Solve(pool, ds, xs, tokens, out_cols, in, entries, out);
  } else {
    Solve(pool, xs, ds, tokens, in, out_cols, entries, out);
  }
}

ffi::Error SampledProduct(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                          ffi::Buffer<ffi::S32> a, ffi::Buffer<ffi::S32> b,
                          ffi::ResultBuffer<ffi::F32> result) {
  const auto xd = x.dimensions();
  const auto dd = dy.dimensions();
  if (xd.size() != 2 || dd.size() != 2 || xd[0] != dd[0]) {
    return ffi::Error::InvalidArgument("sampled_product: x and dy must be [T, in], [T, out]");
  }
  const int64_t tokens = xd[0], in = xd[1], out_cols = dd[1];
  const int64_t k = static_cast<int64_t>(a.element_count());
  if (static_cast<int64_t>(b.element_count()) != k ||
      static_cast<int64_t>(result->element_count()) != k) {
    return ffi::Error::InvalidArgument("sampled_product: a, b and the result must be (k,)");
  }
  float* out = result->typed_data();
  if (k == 0) return ffi::Error::Success();
  if (tokens == 0) {
    std::fill(out, out + k, 0.0f);
    return ffi::Error::Success();
  }
  const bool dy_major = out_cols >= in;
  SortedEntries entries;
  const bool ok = dy_major
      ? SortEntries(b.typed_data(), a.typed_data(), k, out_cols, in, &entries)
      : SortEntries(a.typed_data(), b.typed_data(), k, in, out_cols, &entries);
  if (!ok) return ffi::Error::InvalidArgument("sampled_product: an entry is out of range");
  const bool x16 = x.element_type() == ffi::DataType::BF16;
  const bool d16 = dy.element_type() == ffi::DataType::BF16;
  if ((!x16 && x.element_type() != ffi::DataType::F32) ||
      (!d16 && dy.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("sampled_product: x and dy must be float32 or bfloat16");
  }
  const void* xp = x.untyped_data();
  const void* dp = dy.untyped_data();
  if (x16 && d16) {
    Dispatch<uint16_t, uint16_t>(pool, xp, dp, tokens, in, out_cols, entries, dy_major, out);
  } else if (x16) {
    Dispatch<uint16_t, float>(pool, xp, dp, tokens, in, out_cols, entries, dy_major, out);
  } else if (d16) {
    Dispatch<float, uint16_t>(pool, xp, dp, tokens, in, out_cols, entries, dy_major, out);
  } else {
    Dispatch<float, float>(pool, xp, dp, tokens, in, out_cols, entries, dy_major, out);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxSampledProduct, SampledProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
