// CPU kernels for decoding steps, called through XLA's FFI: a matrix product of a few rows by a
// weight matrix stored one output per row (float32, or bfloat16 or int8 widened as it is read),
// which reads the weights once for up to 4 rows (more rows take more passes over each chunk of
// weights, the later ones from L2; XLA's dot reads a 1-row product at memory speed but a 2-8-row
// one about 2x slower), and attention of a few new positions over a KV cache that reads only the
// slots each query sees, row by row.
//
// Built at first use by mtp_jax/kernels/__init__.py with the host's own instruction set, by GCC
// (the vector shuffles are GCC's own builtins; where the build fails, with clang say, decoding
// uses XLA alone; tested on x86-64 only). The float vectors below are one AVX-512 register (16
// lanes) where the machine has AVX-512, and 8 lanes elsewhere: one AVX2 register, or two SSE
// (or, untested, NEON) ones. (16 lanes on AVX2 made every vector two registers, and the
// products' accumulators no longer fit in the 16 registers AVX2 has: a 1-row product ran at half
// memory speed, an 8-row one 2.8x slower than XLA's dot.)

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#define MTPJAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int TiledReady();

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// Weights in bfloat16 (the high half of a float32's bits), widened to float32 as they are read.
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef unsigned vu __attribute__((vector_size(kLanes * sizeof(unsigned))));
inline vf load(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
// Weights in int8 (a row's scale is applied to the product by the caller), widened exactly. GCC
// turns __builtin_convertvector from int8 to float into one scalar conversion per lane, so the
// sign extension and conversion are written with the instruction set's own intrinsics.
inline vf load(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
  return v;
#endif
}
inline float widen(float x) { return x; }
inline float widen(int8_t x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline vf splat(float x) { return vf{} + x; }
// a * b + c rounded once where the machine has FMA instructions. The library is built with
// -ffp-contract=off and fuses only here: GCC left to itself fused some instances of the row
// kernel's loop and not others, so a row's sums depended on the rows beside it.
inline vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
typedef int vi __attribute__((vector_size(kLanes * sizeof(int))));
#if defined(__AVX512F__)
const vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
const vi kIota = {0, 1, 2, 3, 4, 5, 6, 7};
#endif
// v with each lane i exchanged for lane i ^ h.
inline vf swapped(vf v, int h) { return __builtin_shuffle(v, kIota ^ h); }

// The lane sum of v by a tree of lane shuffles: lane i plus lane i + kLanes / 2, then of those
// lane i plus lane i + kLanes / 4, ..., down to lanes 0 and 1. sums_of adds in the same order.
inline float hsum(vf v) {
  for (int h = kLanes / 2; h > 1; h /= 2) v += swapped(v, h);
  return v[0] + v[1];
}

// e^x for x <= 0, lane by lane (-inf gives 0): 2^n e^r with n = round(x / ln 2) and r in
// [-ln 2 / 2, ln 2 / 2], e^r by a degree-7 polynomial (Cephes' expf coefficients), within
// about 2 ulp of std::exp. Attention's softmax takes one per score, where a scalar std::exp
// per score was a large share of the kernel's time.
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f);  // e^-87 is still a normal float; 2^n below needs n >= -126
  const vf y = x < lo ? lo : x;
  const vi n = __builtin_convertvector(y * 1.44269504088896341f - 0.5f, vi);  // rounds, y <= 0
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = y - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf er = p * r * r + r + 1.0f;
  const vf scale = (vf)((n + 127) << 23);
  return x == splat(-INFINITY) ? splat(0.f) : er * scale;
}

// The lane sums of kLanes vectors as one vector (lane j: the sum of v[j]'s lanes): rounds that
// each add two half-width interleavings, kLanes - 1 shuffle pairs where kLanes separate sums
// take kLanes x log2(kLanes).
#if defined(__AVX512F__)
inline vf sums_of(const vf* v) {
  vf a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = __builtin_shuffle(v[2 * j], v[2 * j + 1], vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                                        20, 21, 22, 23}) +
           __builtin_shuffle(v[2 * j], v[2 * j + 1], vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                                        26, 27, 28, 29, 30, 31});
  for (int j = 0; j < 4; ++j)
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                                        24, 25, 26, 27}) +
           __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                                        23, 28, 29, 30, 31});
  for (int j = 0; j < 2; ++j)
    c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], vi{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21,
                                                        24, 25, 28, 29}) +
           __builtin_shuffle(b[2 * j], b[2 * j + 1], vi{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                                        23, 26, 27, 30, 31});
  return __builtin_shuffle(c[0], c[1], vi{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                          30}) +
         __builtin_shuffle(c[0], c[1], vi{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                          31});
}
#else
inline vf sums_of(const vf* v) {
  vf a[4], b[2];
  for (int j = 0; j < 4; ++j)
    a[j] = __builtin_shuffle(v[2 * j], v[2 * j + 1], vi{0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(v[2 * j], v[2 * j + 1], vi{4, 5, 6, 7, 12, 13, 14, 15});
  for (int j = 0; j < 2; ++j)
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{0, 1, 4, 5, 8, 9, 12, 13}) +
           __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{2, 3, 6, 7, 10, 11, 14, 15});
  return __builtin_shuffle(b[0], b[1], vi{0, 2, 4, 6, 8, 10, 12, 14}) +
         __builtin_shuffle(b[0], b[1], vi{1, 3, 5, 7, 9, 11, 13, 15});
}
#endif

// out[i] = the lane sum of v[i] for i < C: kLanes at a time through sums_of, whose additions are
// hsum's, in hsum's order, so a row's product is bit for bit the same whatever the number of rows
// beside it (the verify's rows equal the ar step's). Left over: a few by hsum, more through
// sums_of with zero vectors beside them.
template <int C>
inline void lane_sums(const vf* v, float* out) {
  int i = 0;
  for (; i + kLanes <= C; i += kLanes) store(out + i, sums_of(v + i));
  if (C - i <= 4) {
    for (; i < C; ++i) out[i] = hsum(v[i]);
  } else {
    vf pad[kLanes];
    for (int j = 0; j < kLanes; ++j) pad[j] = i + j < C ? v[i + j] : vf{};
    const vf s = sums_of(pad);
    for (int j = 0; i + j < C; ++j) out[i + j] = s[j];
  }
}

inline void prefetch_bytes(const void* p, int64_t bytes) {  // one prefetch a cache line
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(static_cast<const char*>(p) + at);
}

// A hint to the core that this thread spins on a flag.
inline void SpinPause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Runs part(i) for i in [0, parts) on XLA's intra-op threads and this one, and waits until every
// part is done. The counters live on the heap: a task the pool starts late finds no part left
// and must not touch this frame, which may be gone by then.
void parallel(ffi::ThreadPool& pool, int64_t parts, const std::function<void(int64_t)>& part) {
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), parts);
  if (workers <= 1) {
    for (int64_t i = 0; i < parts; ++i) part(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const std::function<void(int64_t)>* fn = &part;
  auto run = [counters, fn, parts] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < parts;) {
      (*fn)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < workers; ++w) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (counters->done.load(std::memory_order_acquire) < parts) SpinPause();
}

// How far ahead (in floats) a block of one or two weight rows prefetches each of them: such a
// block reads too few streams at once for the hardware prefetcher to keep enough misses in
// flight while the core also computes. Blocks of more rows read as many streams, far apart
// (rows_block), and prefetching them too made them slower (on a Zen 4 VM, 8-row blocks then,
// experiments/row_kernel.py's chain: 4 rows 13.3 ms against 11.8 without). With AVX-512 every
// block is 4 rows, so only the few rows left over at a chunk's end prefetch; with 8 lanes the
// 2-row blocks of 4 input rows do (not timed since the change). The exception: a block of 2 to
// 4 input rows on the pass that reads its weights from memory (the first over a chunk), whose
// arithmetic otherwise delays the reads. On an Intel VM (Sapphire Rapids) row_kernel.py's chain
// took 14.69 / 15.04 / 15.28 ms with it for 2 / 3 / 4 rows against 14.97 / 16.10 / 16.82
// without, and 8 / 16 / 32 rows 18.9 / 24.4 / 36.1 against 20.8 / 27.1 / 38.6 (1 row 14.4
// against 14.1). Prefetching on the later passes too, which read from L2, made 32 rows slower
// (43.4 ms against 40.4). Not timed on the Zen 4 VM since.
constexpr int64_t kPrefetch = 2048;

// Up to kMaxRows input rows per pass over a thread's chunk of weight rows (RowsMatmulImpl); more
// rows take several passes, the later ones reading the chunk from L2. Four rows a pass, not
// eight, which took blocks of 2 weight rows with AVX-512: on a Zen 4 VM 8 rows took 19.8 ms in
// two passes of 4 against 21.6 ms in one of 8.
constexpr int kMaxRows = 4;

// Weight rows dotted at once with M <= kMaxRows input rows: enough independent accumulators
// (R x M) to keep the FMA units busy, few enough to stay in registers beside R weight vectors
// and an input one (AVX-512 has 32 vector registers, AVX2 16; at M = 3 the 8-lane blocks need
// 17, so hold() leaves them to GCC, which folds the loads into the FMAs: that case stays bound by
// loads; 4 rows there were chosen on the AVX2 VM before the change and not timed against 2
// since), and each of the R rows a separate stream.
constexpr int BlockRows(int M) { return kLanes == 16 ? 4 : (M <= 3 ? 4 : 2); }

// Vector registers: 32 with AVX-512, 16 with AVX2.
#if defined(__AVX512F__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// Holds v in a register from here on when `live` vectors fit in the registers: left to itself,
// GCC folds each weight and input load into every FMA that reads it, so the row kernel's loop
// issued a load per FMA and was bound by loads, not FMAs (on a Zen 4 VM, with the weights in
// cache, 4 rows took 8.8 ms where holding them takes 4.9, and 32 rows read from memory 68 ms
// against 41). Where they do not fit (8 lanes, M = 3: 17 vectors) holding them spills.
template <int live>
inline void hold(vf& v) {
#if defined(__x86_64__) && defined(__AVX2__)
  if constexpr (live <= kRegisters) asm("" : "+v"(v));
#endif
}

// y[m, n] = sum_k x[m, k] w[n, k] for rows [n0, n0 + R * blocks) of w: R rows of w at a time,
// dotted with every x row in registers. W: float, uint16_t for bfloat16, or int8_t.
// The R rows of a block are `blocks` rows apart (block b takes rows n0 + b + r * blocks), so a
// block reads R streams from separate parts of memory; R adjacent rows read as one stream kept
// fewer reads in flight (on a Zen 4 VM, experiments/row_kernel.py's chain: 1 row 14.8 ms with
// adjacent rows, 13.3 with these; 4 rows 17.3 against 13.3).
// Every output is summed in the same order whatever R and M are: lanes over k, then lane_sums,
// then the k past the last full vector.
template <int M, int R, bool kFromMemory, typename W>
void rows_block(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0,
                int64_t blocks) {
  constexpr int64_t kAhead = kPrefetch * sizeof(float) / sizeof(W);  // the same bytes ahead
  constexpr int kLive = R * M + R + 1;  // vectors the loop keeps: accumulators, weights, input
  for (int64_t n = n0; n < n0 + blocks; ++n) {
    const W* row[R];
    for (int r = 0; r < R; ++r) row[r] = w + (n + r * blocks) * K;
    vf acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = vf{};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      vf wv[R];
      for (int r = 0; r < R; ++r) {
        if (R <= 2 || (kFromMemory && M >= 2)) __builtin_prefetch(row[r] + k + kAhead);
        wv[r] = load(row[r] + k);
        hold<kLive>(wv[r]);
      }
      for (int m = 0; m < M; ++m) {
        vf xv = load(x + m * K + k);
        hold<kLive>(xv);
        for (int r = 0; r < R; ++r) acc[r][m] = fma(wv[r], xv, acc[r][m]);
      }
    }
    float sums[R * M];
    lane_sums<R * M>(&acc[0][0], sums);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float s = sums[r * M + m];
        for (int64_t kk = k; kk < K; ++kk) s += widen(row[r][kk]) * x[m * K + kk];
        y[m * N + n + r * blocks] = s;
      }
  }
}

// Rows [n0, n1) of w: blocks of BlockRows(M), the rows left over one at a time.
template <int M, bool kFromMemory, typename W>
void rows_nk(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  constexpr int R = BlockRows(M);
  const int64_t blocks = (n1 - n0) / R;
  rows_block<M, R, kFromMemory>(x, w, y, K, N, n0, blocks);
  rows_block<M, 1, kFromMemory>(x, w, y, K, N, n0 + R * blocks, n1 - n0 - R * blocks);
}

// `from_memory`: this pass is the first over these weight rows, which it reads from memory.
template <int M, typename W>
void rows_pass(bool from_memory, const float* x, const W* w, float* y, int64_t K, int64_t N,
               int64_t n0, int64_t n1) {
  if (from_memory)
    rows_nk<M, true>(x, w, y, K, N, n0, n1);
  else
    rows_nk<M, false>(x, w, y, K, N, n0, n1);
}

template <typename W>
void rows_some(int rows, bool from_memory, const float* x, const W* w, float* y, int64_t K,
               int64_t N, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: return rows_pass<1>(from_memory, x, w, y, K, N, n0, n1);
    case 2: return rows_pass<2>(from_memory, x, w, y, K, N, n0, n1);
    case 3: return rows_pass<3>(from_memory, x, w, y, K, N, n0, n1);
    default: return rows_pass<4>(from_memory, x, w, y, K, N, n0, n1);
  }
}

// y (M, N) = x (M, K) times w (N, K) transposed: the weights stored one output per row.
template <ffi::DataType T>
ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || wd[1] != xd.back())
    return ffi::Error::InvalidArgument("rows_matmul: x (..., K) and w (N, K) expected");
  const int64_t K = xd.back(), N = wd[0];
  const int64_t M = x.element_count() / std::max<int64_t>(K, 1);
  const float* xp = x.typed_data();
  const auto* wp = w.typed_data();
  float* yp = y->typed_data();
  // Output columns (weight rows) split into chunks for the threads. A chunk's weights (64 rows)
  // fit in the L2 cache, so passes of kMaxRows input rows after the first read them from there,
  // not from memory again.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  parallel(pool, chunks, [&](int64_t c) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
      rows_some(rows, m0 == 0, xp + m0 * K, wp, yp + m0 * N, K, N, c * kChunk,
                std::min(N, (c + 1) * kChunk));
    }
  });
  return ffi::Error::Success();
}


// A block of a tiled or scaled matrix: 16 weight rows by 32 columns (a scaled matrix's run).
constexpr int64_t kRun = 32, kRunRows = 16;

// Tiled matrices (kernels.tiled): an N x K float32 matrix whose every entry w is the sum of two
// bfloat16 numbers, hi = bf16(w) and lo = bf16(w - hi), kept as those two in AMX's layout for the
// second operand of a tile product. For each block of 16 rows (n) by 32 columns (k), in
// row-block-major order, the hi tile then the lo tile, each 16 rows of column pairs (2r, 2r + 1)
// by 16 n by 2: 1 KiB. The same 4 bytes an entry as float32, so a 1-row product reads what the
// float32 row kernel reads; the tile unit (AMX) multiplies up to 16 input rows for the cost of
// one, where the float32 kernel's arithmetic grows with the rows (experiments/row_kernel.py).
//
// Each input row is split the same way into three bfloat16 pieces, x = x0 + x1 + x2 exactly, and
// y = x0 hi + x1 hi + x0 lo + x2 hi + x1 lo in float32 tile sums (x2 lo, below float32's
// rounding of the sum, is left out): every product of two pieces is exact in float32, so y
// differs from the float32 product in the order of its additions, that left-out term and
// bfloat16 values below float32's normal range, which the conversions and the tile unit flush to
// zero. A row's sums are the same whatever the rows beside it: the tile unit computes each row
// of a product on its own.
#if MTPJAX_AMX
constexpr int kTile = kRunRows, kPair = kRun;  // a tile block: 16 weight rows by 32 columns
constexpr int64_t kTileHalves = kTile * kPair;  // bfloat16 values in one tile (1 KiB)
constexpr int kGroup = 3;  // weight-row blocks a task multiplies at once: three sum chains

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-2: sums (rows x 16 floats); 3-5: the input pieces (rows x 32 bfloat16); 6, 7: weight
// tiles (tile_group: a block's hi and lo; scaled_group: one block's, the next block's).
inline void configure_tiles(int rows) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.bytes_per_row[t] = 64;
    c.rows[t] = t < 6 ? rows : kTile;
  }
  // GCC does not model the tile instruction as reading c: called out of line, it dropped the
  // stores above as dead and the instruction faulted on what the stack held
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// x (M x K float32) as three bfloat16 pieces, each Mp x K (rows past M zero): x = x0 + x1 + x2,
// each piece rounded to nearest even. K is a multiple of 32, so the vectors cover x.
void split_rows(const float* x, int64_t M, int64_t Mp, int64_t K, uint16_t* pieces) {
  const int64_t n = M * K;
  uint16_t* p0 = pieces;
  uint16_t* p1 = pieces + Mp * K;
  uint16_t* p2 = pieces + 2 * Mp * K;
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    __m256bh h0 = _mm512_cvtneps_pbh(v);
    v = _mm512_sub_ps(v, _mm512_cvtpbh_ps(h0));
    __m256bh h1 = _mm512_cvtneps_pbh(v);
    v = _mm512_sub_ps(v, _mm512_cvtpbh_ps(h1));
    __m256bh h2 = _mm512_cvtneps_pbh(v);
    std::memcpy(p0 + i, &h0, 32);
    std::memcpy(p1 + i, &h1, 32);
    std::memcpy(p2 + i, &h2, 32);
  }
  std::memset(p0 + n, 0, (Mp * K - n) * 2);
  std::memset(p1 + n, 0, (Mp * K - n) * 2);
  std::memset(p2 + n, 0, (Mp * K - n) * 2);
}

// Each weight block asks for the next one of its stream (2 KiB ahead): on an Intel VM
// (Sapphire Rapids) experiments/row_kernel.py's 1-row chain took 17.2 ms without it, 15.9 with
// it, 15.8 / 16.2 / 18.2 / 19.2 two / four / eight / sixteen blocks ahead (the float32 kernel
// 14.5-15.1 in the same runs).
constexpr int64_t kAheadHalves = 2 * kTileHalves;

// One weight block's five tile products into sum tile C: its (hi, lo) tiles at w. Macros, not
// functions: GCC's tile intrinsics take the tile's number as a literal.
#define MTPJAX_TILE_PRODUCTS(C, w)          \
  do {                                      \
    prefetch_bytes((w) + kAheadHalves, 4 * kTileHalves); /* hi and lo */ \
    _tile_loadd(6, (w), 64);                \
    _tile_loadd(7, (w) + kTileHalves, 64);  \
    _tile_dpbf16ps(C, 3, 6);                \
    _tile_dpbf16ps(C, 4, 6);                \
    _tile_dpbf16ps(C, 3, 7);                \
    _tile_dpbf16ps(C, 5, 6);                \
    _tile_dpbf16ps(C, 4, 7);                \
  } while (0)

// Sum tile C's first `rows` rows into y's columns [col, col + 16), through tmp.
#define MTPJAX_STORE_SUMS(C, tmp, y, rows, N, col)                                   \
  do {                                                                               \
    _tile_stored(C, (tmp), kTile * sizeof(float));                                   \
    for (int64_t m = 0; m < (rows); ++m)                                             \
      std::memcpy((y) + m * (N) + (col), (tmp) + m * kTile, kTile * sizeof(float)); \
  } while (0)

// Rows [m0, m0 + 16) (or all M <= 16) of y for G weight-row blocks from block nb.
template <int G>
void tile_group(const uint16_t* pieces, int64_t Mp, int64_t K, const uint16_t* w, float* y,
                int64_t M, int64_t N, int64_t nb, int64_t m0) {
  const int64_t blocks_k = K / kPair, stride = blocks_k * 2 * kTileHalves;
  const uint16_t* x0 = pieces + m0 * K;
  const uint16_t* x1 = x0 + Mp * K;
  const uint16_t* x2 = x1 + Mp * K;
  const uint16_t* wb = w + nb * stride;
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  for (int64_t kb = 0; kb < blocks_k; ++kb) {
    _tile_loadd(3, x0 + kb * kPair, K * 2);
    _tile_loadd(4, x1 + kb * kPair, K * 2);
    _tile_loadd(5, x2 + kb * kPair, K * 2);
    const uint16_t* block = wb + kb * 2 * kTileHalves;
    MTPJAX_TILE_PRODUCTS(0, block);
    if constexpr (G > 1) MTPJAX_TILE_PRODUCTS(1, block + stride);
    if constexpr (G > 2) MTPJAX_TILE_PRODUCTS(2, block + 2 * stride);
  }
  alignas(64) float tmp[kTile * kTile];
  const int64_t rows = std::min<int64_t>(kTile, M - m0);
  MTPJAX_STORE_SUMS(0, tmp, y + m0 * N, rows, N, nb * kTile);
  if constexpr (G > 1) MTPJAX_STORE_SUMS(1, tmp, y + m0 * N, rows, N, (nb + 1) * kTile);
  if constexpr (G > 2) MTPJAX_STORE_SUMS(2, tmp, y + m0 * N, rows, N, (nb + 2) * kTile);
}

// x's M rows (K each) as three bfloat16 pieces (split_rows; Mp rows, padded past 16), then
// run(G, pieces, Mp, nb, m0) for every group of G <= kGroup weight-row blocks from block nb of
// N / 16 (G a std::integral_constant, for the group functions' template) and every 16 input rows
// from m0: one task per thread, each a run of groups, the
// later passes over a group reading its blocks from L2. With a task per group instead,
// configuring and releasing the tiles each time, the trunk's 1-position step took 22.2 ms against
// 19.2 for the float32 kernel (experiments/decode_profile.py, two runs one after the other).
template <typename Run>
void over_groups(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                 const Run& run) {
  const int64_t Mp = M <= kTile ? M : (M + kTile - 1) / kTile * kTile;
  std::vector<uint16_t> pieces(3 * Mp * K);
  split_rows(x, M, Mp, K, pieces.data());
  const int64_t blocks = N / kTile, groups = (blocks + kGroup - 1) / kGroup;
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), groups);
  parallel(pool, tasks, [&](int64_t task) {
    configure_tiles(static_cast<int>(std::min<int64_t>(Mp, kTile)));
    for (int64_t g = groups * task / tasks; g < groups * (task + 1) / tasks; ++g) {
      const int64_t nb = g * kGroup, left = std::min<int64_t>(kGroup, blocks - nb);
      static_assert(kGroup == 3, "a group has 1 to 3 blocks");
      for (int64_t m0 = 0; m0 < Mp; m0 += kTile) {
        if (left == 3)
          run(std::integral_constant<int, 3>{}, pieces.data(), Mp, nb, m0);
        else if (left == 2)
          run(std::integral_constant<int, 2>{}, pieces.data(), Mp, nb, m0);
        else
          run(std::integral_constant<int, 1>{}, pieces.data(), Mp, nb, m0);
      }
    }
    _tile_release();
  });
}
#endif

// y (M, N) = x (M, K) times the tiled matrix w (N, K) transposed, any M (over_groups).
ffi::Error RowsMatmulTiledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::U32> w, ffi::ResultBuffer<ffi::F32> y) {
#if MTPJAX_AMX
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || wd[1] != xd.back() || wd[0] % kTile ||
      wd[1] % kPair)
    return ffi::Error::InvalidArgument(
        "rows_matmul: x (..., K) and a tiled w (N, K), N % 16 == 0 and K % 32 == 0, expected");
  const int64_t K = xd.back(), N = wd[0];
  const int64_t M = x.element_count() / std::max<int64_t>(K, 1);
  if (M == 0) return ffi::Error::Success();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  over_groups(pool, x.typed_data(), M, K, N,
              [&](auto G, const uint16_t* xs, int64_t Mp, int64_t nb, int64_t m0) {
                tile_group<decltype(G)::value>(xs, Mp, K, wp, yp, M, N, nb, m0);
              });
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "rows_matmul: built without AMX");
#endif
}

// Scaled matrices (kernels.ScaledTiles): an N x K float32 matrix whose every run of 32 entries
// along a row is a float16 scale times integers of at most 8 bits, plus (affine) a float16
// offset, as a GGUF file's Q8_0 tensors dequantize (a scale times an int8; SmolLM2's embedding,
// also its output matrix; Q5_0's alike) and its Q4_1 ones (a scale times a 4-bit integer plus an
// offset; SmolLM2's blocks; Q4_0's d (q - 8) as d q - 8 d). The integers are exact in bfloat16
// and kept in tiles, one per block of 16 rows by 32 columns (row blocks first), in the order of
// a tile product's second operand: int8, one byte each, or 0 to 15 two to a byte (uint8); each
// tile is widened to bfloat16 in L1 while the tile before it multiplies. s holds each block's 16
// row scales, then (affine) their 16 offsets, 2 or 4 bytes per 32 entries, where float32 takes 4
// bytes an entry.
// y = the sum over the row's runs of scale x (x0 q + x1 q + x2 q) (+ offset x the run's sum of
// x): each piece product is exact in float32; a run's are summed in its tile (rounded as float32
// sums are), then scaled and added in float32, in the same order whatever the rows beside it.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define MTPJAX_SCALED_FMA 1

// Each input row's sums over its runs of 32 (M x K / 32): the run's vectors added, then their
// lanes.
std::vector<float> sums_of_runs(const float* x, int64_t M, int64_t K) {
  std::vector<float> sums(M * (K / kRun));
  for (int64_t i = 0; i < M * (K / kRun); ++i) {
    vf v = load(x + i * kRun);
    for (int j = kLanes; j < kRun; j += kLanes) v += load(x + i * kRun + j);
    sums[i] = hsum(v);
  }
  return sums;
}

// Scaled products without the tile unit, on the FMAs of AVX-512 (16 lanes) or AVX2 (8): the
// same ScaledTiles, for CPUs without AMX. A block's tile holds its 32 columns as 16 pairs, each
// pair's 32 integers row by row (16 rows x 2 columns). A part of a pair (kPartRows rows: 8 with
// 16 lanes, 4 with 8) widens to one float vector, lane 2i + j holding row i's column 2p + j, and
// an FMA with the input's two entries of that pair (x[2p], x[2p + 1] repeated) adds to each
// row's even and odd columns' sums in its own lanes. A run's sums are scaled once (each row's
// scale in its two lanes), its offsets times the input run's sum added (in the even lanes
// alone), and at the end each row's two lanes added. Every input row's sums take the same steps
// whatever the rows beside it.
constexpr int kPartRows = kLanes / 2, kParts = kRunRows / kPartRows;
// Parts of a block taken in one pass over its runs, and input rows a pass: with 16 lanes both
// parts and 4 rows (16 sums of a run, 8 totals, 2 weight vectors and an input pair in AVX-512's
// 32 registers); with 8 lanes one part and 4 rows (8 sums, 4 totals, a weight vector and an
// input pair in AVX2's 16), the block's four parts in four passes, which find its integers in
// L1 after the first (a block holds K x 16 bytes, or K x 8 for 4-bit integers: SmolLM2's K of
// 576 and 1536 fit a 32 KiB L1). More rows take more passes, which read them from L1 or L2.
constexpr int kPassParts = kLanes == 16 ? 2 : 1, kScaledRows = 4;

// Part s of pair p of a tile of int8 integers (512 bytes: pair p at 32 p), widened.
inline vf pair_part(const int8_t* tile, int p, int s) { return load(tile + 32 * p + kLanes * s); }
// Part s of pair p of a tile of integers 0 to 15 two to a byte (256 bytes: pairs 2c and 2c + 1
// in the low and high nibbles of bytes 32 c to 32 c + 31), widened.
inline vf pair_part(const uint8_t* tile, int p, int s) {
  const uint8_t* at = tile + 32 * (p / 2) + kLanes * s;
#if defined(__AVX512F__)
  // through a table of the 16 numbers (vpermps reads an index's low 4 bits: a low nibble needs
  // no mask)
  const __m512 numbers = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  if (p % 2) bytes = _mm512_srli_epi32(bytes, 4);
  return (vf)_mm512_permutexvar_ps(bytes, numbers);
#else
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
  bytes = p % 2 ? _mm256_srli_epi32(bytes, 4) : _mm256_and_si256(bytes, _mm256_set1_epi32(15));
  return (vf)_mm256_cvtepi32_ps(bytes);
#endif
}
// x[0], x[1] in every pair of lanes.
inline vf pair_splat(const float* x) {
  double pair;
  std::memcpy(&pair, x, sizeof(pair));
#if defined(__AVX512F__)
  return (vf)_mm512_castpd_ps(_mm512_set1_pd(pair));
#else
  return (vf)_mm256_castpd_ps(_mm256_set1_pd(pair));
#endif
}
// kLanes float16 numbers, widened.
inline vf load_halves(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}
const vi kPairOf = kIota / 2;  // lane 2i + j takes row i's number
const vi kEven = (kIota & 1) == 0;

// y's kPartRows x G columns of parts [s0, s0 + G) of one scaled block, for M <= kScaledRows
// input rows (x, run_sums: K and K / 32 apart; y: N apart): the block's tiles (K / 32 of them)
// and its scales (K / 32 x S x 16).
template <int M, int G, bool kAffine, typename Q>
void fma_parts(const float* x, const float* run_sums, const Q* tiles, const uint16_t* scales,
               float* y, int64_t K, int64_t N, int s0) {
  constexpr int64_t S = kAffine ? 2 : 1;
  constexpr int64_t kBytes = std::is_same_v<Q, uint8_t> ? kRun * kRunRows / 2 : kRun * kRunRows;
  const int64_t runs = K / kRun;
  // The pass's rows (kPassParts x kPartRows <= kLanes) are among the kLanes of a run's 16 row
  // scales (and offsets) that start at `first`: each run widens those to one vector, and part g
  // takes its rows' from it in registers.
  const int first = kPartRows * s0 / kLanes * kLanes;
  vf total[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) total[m][g] = vf{};
  for (int64_t kb = 0; kb < runs; ++kb) {
    const Q* tile = tiles + kb * kBytes;
    if (s0 == 0) prefetch_bytes(tile + 4 * kBytes, kBytes);
    vf sum[M][G][2];  // input row, part, pair parity: two chains of 8 FMAs a run
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < G; ++g) sum[m][g][0] = sum[m][g][1] = vf{};
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      vf w[G];
      for (int g = 0; g < G; ++g) w[g] = pair_part(tile, p, s0 + g);
      for (int m = 0; m < M; ++m) {
        const vf xv = pair_splat(x + m * K + kb * kRun + 2 * p);
        for (int g = 0; g < G; ++g) sum[m][g][p % 2] = fma(w[g], xv, sum[m][g][p % 2]);
      }
    }
    const uint16_t* run_scales = scales + kb * S * kRunRows + first;
    const vf scales_here = load_halves(run_scales);
    const vf offsets_here = kAffine ? load_halves(run_scales + kRunRows) : vf{};
    for (int g = 0; g < G; ++g) {
      const vi pick = kPairOf + (kPartRows * (s0 + g) - first);
      const vf scale = __builtin_shuffle(scales_here, pick);
      for (int m = 0; m < M; ++m) total[m][g] = fma(sum[m][g][0] + sum[m][g][1], scale,
                                                     total[m][g]);
      if constexpr (kAffine) {  // in the even lanes only: added once per row
        const vf offset = kEven ? __builtin_shuffle(offsets_here, pick) : vf{};
        for (int m = 0; m < M; ++m)
          total[m][g] = fma(offset, splat(run_sums[m * runs + kb]), total[m][g]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) {
      const vf both = total[m][g] + swapped(total[m][g], 1);  // row i's two lanes, in lane 2i
      for (int i = 0; i < kPartRows; ++i) y[m * N + kPartRows * (s0 + g) + i] = both[2 * i];
    }
}

// y's 16 columns of one scaled block for M <= kScaledRows input rows, its parts kPassParts at a
// time.
template <bool kAffine, typename Q>
void fma_block(int rows, const float* x, const float* run_sums, const Q* tiles,
               const uint16_t* scales, float* y, int64_t K, int64_t N) {
  constexpr int G = kPassParts;
  for (int s0 = 0; s0 < kParts; s0 += G) {
    switch (rows) {
      case 1: fma_parts<1, G, kAffine>(x, run_sums, tiles, scales, y, K, N, s0); break;
      case 2: fma_parts<2, G, kAffine>(x, run_sums, tiles, scales, y, K, N, s0); break;
      case 3: fma_parts<3, G, kAffine>(x, run_sums, tiles, scales, y, K, N, s0); break;
      default: fma_parts<4, G, kAffine>(x, run_sums, tiles, scales, y, K, N, s0);
    }
  }
}

// y (M, N) = x (M, K) times the scaled matrix (q, s) transposed on FMAs: the blocks of 16
// weight rows split among the threads in chunks of 4 (64 rows, as the row kernel's), each
// block's passes of kScaledRows input rows one after another.
template <bool kAffine, typename Q>
void fma_scaled_product(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                        const Q* q, const uint16_t* s, float* y) {
  const std::vector<float> run_sums = kAffine ? sums_of_runs(x, M, K) : std::vector<float>();
  constexpr int64_t S = kAffine ? 2 : 1, kChunk = 4;
  const int64_t blocks = N / kRunRows, runs = K / kRun;
  const int64_t block_bytes = std::is_same_v<Q, uint8_t> ? K * kRunRows / 2 : K * kRunRows;
  parallel(pool, (blocks + kChunk - 1) / kChunk, [&](int64_t c) {
    for (int64_t b = c * kChunk; b < std::min(blocks, (c + 1) * kChunk); ++b)
      for (int64_t m0 = 0; m0 < M; m0 += kScaledRows)
        fma_block<kAffine>(static_cast<int>(std::min<int64_t>(kScaledRows, M - m0)),
                           x + m0 * K, run_sums.data() + m0 * runs, q + b * block_bytes,
                           s + b * runs * S * kRunRows, y + m0 * N + b * kRunRows, K, N);
  });
}
#endif

#if MTPJAX_AMX && !MTPJAX_SCALED_FMA
#error "an AMX build has AVX-512, whose FMA form of the scaled products (sums_of_runs) it uses"
#endif
#if MTPJAX_AMX
static_assert(kLanes == kTile, "a row of a tile's sums is one float vector (load_halves: its "
              "16 scales)");
// A tile of integers 0 to 15 (Q4_1's), two to a byte (256 bytes: in each run of 32 bytes the low
// nibbles hold 32 entries and the high ones the next 32), as the bfloat16 tile `out`: each
// nibble an index into a table of the 16 numbers' bfloat16 bits (vpermw reads an index's low 5
// bits, so the table repeats after 16 and a low nibble needs no mask).
inline void widen_tile(const uint8_t* in, uint16_t* out) {
  alignas(64) static const uint16_t kBf16[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,   // bfloat16 0 to 7
      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,   // 8 to 15
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,   // again
      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i table = _mm512_load_si512(kBf16);
  for (int i = 0; i < kTileHalves / 64; ++i) {
    const __m512i bytes =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 32 * i)));
    _mm512_store_si512(out + 64 * i, _mm512_permutexvar_epi16(bytes, table));
    _mm512_store_si512(out + 64 * i + 32,
                       _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
  }
}
// A tile of int8 integers (Q8_0's, 512 bytes) as the bfloat16 tile `out`: each 32 bytes
// sign-extended and converted to float32 (exact), then to bfloat16 (exact: at most 8 bits).
inline void widen_tile(const int8_t* in, uint16_t* out) {
  for (int i = 0; i < kTileHalves / 32; ++i) {
    const __m512 lo = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 32 * i))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 32 * i + 16))));
    _mm512_store_si512(out + 32 * i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// MTPJAX_SCALED_PARTS below 2 leaves parts of each run's work out of the scaled products, which
// then give wrong sums: experiments/row_kernel.py --decompose builds such libraries to time
// what the parts cost (1: the sums stored from the tile but not scaled and added; 0: the tile
// products alone). Every library that decodes keeps the default.
#ifndef MTPJAX_SCALED_PARTS
#define MTPJAX_SCALED_PARTS 2
#endif
constexpr int kScaledParts = MTPJAX_SCALED_PARTS;

// Bytes of one stored tile: Q4_1's integers two to a byte (uint8), Q8_0's one (int8).
template <typename Q>
constexpr int64_t kTileBytes = std::is_same_v<Q, uint8_t> ? kTileHalves / 2 : kTileHalves;

// Weight block g's products into sum tile C (from zero), its sums scaled by its 16 row scales
// (and its offsets times each row's run sums) into `sums` (rows x 16 floats), through tmp. The
// weight tile, widened to bfloat16 one k-block ahead (widened_tile), goes through tile 6 or 7.
#define MTPJAX_SCALED_PRODUCTS(C, B, g)                                            \
  do {                                                                             \
    const Q* tile = qb + (g) * stride + kb * kTileBytes<Q>;                        \
    const uint16_t* scales = sb + ((g) * blocks_k + kb) * S * kTile;               \
    if (widen) prefetch_bytes(tile + 2 * kTileBytes<Q>, kTileBytes<Q>);           \
    __builtin_prefetch(scales + 2 * S * kTile);                                    \
    _tile_loadd(B, widened_tile(g, kb), 64);                                       \
    if (widen && kb + 1 < blocks_k)                                                \
      widen_tile(tile + kTileBytes<Q>, widened_tile(g, kb + 1));                   \
    asm volatile("" ::: "memory"); /* the widened tile stored before its load */    \
    _tile_zero(C);                                                                 \
    _tile_dpbf16ps(C, 3, B);                                                       \
    _tile_dpbf16ps(C, 4, B);                                                       \
    _tile_dpbf16ps(C, 5, B);                                                       \
    if constexpr (kScaledParts < 1) break; /* timing only: products alone */       \
    _tile_stored(C, tmp[g], kTile * sizeof(float));                                \
    if constexpr (kScaledParts < 2) break; /* timing only: no scaling */           \
    const vf scale = load_halves(scales);                                          \
    if constexpr (kAffine) {                                                       \
      const vf offset = load_halves(scales + kTile);                               \
      for (int64_t m = 0; m < rows; ++m)                                           \
        store(sums[g] + m * kTile, load(sums[g] + m * kTile) +                     \
                                       load(tmp[g] + m * kTile) * scale +          \
                                       offset * run_sums[m * blocks_k + kb]);      \
    } else {                                                                       \
      for (int64_t m = 0; m < rows; ++m)                                           \
        store(sums[g] + m * kTile,                                                 \
              load(sums[g] + m * kTile) + load(tmp[g] + m * kTile) * scale);       \
    }                                                                              \
  } while (0)

// Rows [m0, m0 + 16) (or all M <= 16) of y for G scaled weight-row blocks from block nb;
// run_sums: each input row's sums over its runs of 32 (M x K / 32; affine only). With one pass
// (M <= 16) each block's tiles are widened into two buffers in turn, the next while the current
// one multiplies; with more, the first pass (m0 = 0) widens the group's tiles into `all` (G x
// K / 32 tiles, which stay in L2) and the later passes over the group read them from there.
template <int G, bool kAffine, typename Q>
void scaled_group(const uint16_t* pieces, int64_t Mp, int64_t K, const Q* q,
                  const uint16_t* s, const float* all_run_sums, float* y, int64_t M, int64_t N,
                  int64_t nb, int64_t m0, uint16_t* all) {
  constexpr int64_t S = kAffine ? 2 : 1;
  const int64_t blocks_k = K / kPair, stride = blocks_k * kTileBytes<Q>;
  const uint16_t* x0 = pieces + m0 * K;
  const uint16_t* x1 = x0 + Mp * K;
  const uint16_t* x2 = x1 + Mp * K;
  const Q* qb = q + nb * stride;
  const uint16_t* sb = s + nb * blocks_k * S * kTile;
  const float* run_sums = kAffine ? all_run_sums + m0 * blocks_k : nullptr;
  const int64_t rows = std::min<int64_t>(kTile, M - m0);
  alignas(64) float sums[G][kTile * kTile] = {};
  alignas(64) float tmp[G][kTile * kTile];
  alignas(64) uint16_t ring[G][2][kTileHalves];
  const bool one_pass = Mp <= kTile, widen = one_pass || m0 == 0;
  const auto widened_tile = [&](int g, int64_t kb) {
    return one_pass ? ring[g][kb & 1] : all + (g * blocks_k + kb) * kTileHalves;
  };
  if (widen)
    for (int g = 0; g < G; ++g) widen_tile(qb + g * stride, widened_tile(g, 0));
  asm volatile("" ::: "memory");
  for (int64_t kb = 0; kb < blocks_k; ++kb) {
    _tile_loadd(3, x0 + kb * kPair, K * 2);
    _tile_loadd(4, x1 + kb * kPair, K * 2);
    _tile_loadd(5, x2 + kb * kPair, K * 2);
    MTPJAX_SCALED_PRODUCTS(0, 6, 0);
    if constexpr (G > 1) MTPJAX_SCALED_PRODUCTS(1, 7, 1);
    if constexpr (G > 2) MTPJAX_SCALED_PRODUCTS(2, 6, 2);
  }
  for (int g = 0; g < G; ++g)
    for (int64_t m = 0; m < rows; ++m)
      std::memcpy(y + (m0 + m) * N + (nb + g) * kTile, sums[g] + m * kTile,
                  kTile * sizeof(float));
}

template <bool kAffine, typename Q>
void scaled_product(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                    const Q* q, const uint16_t* s, float* y) {
  const std::vector<float> run_sums = kAffine ? sums_of_runs(x, M, K) : std::vector<float>();
  const float* rs = run_sums.data();
  over_groups(pool, x, M, K, N,
              [&](auto G, const uint16_t* xs, int64_t Mp, int64_t nb, int64_t m0) {
                // a thread's widened tiles of its current group, for passes past the first
                // (64-byte aligned, as the widening stores them)
                thread_local std::vector<uint16_t> all;
                uint16_t* at = nullptr;
                if (Mp > kTile) {
                  all.resize(kGroup * (K / kPair) * kTileHalves + 32);
                  at = all.data() + (-reinterpret_cast<uintptr_t>(all.data()) % 64) / 2;
                }
                scaled_group<decltype(G)::value, kAffine, Q>(xs, Mp, K, q, s, rs, y, M, N, nb,
                                                             m0, at);
              });
}
#endif

// y (M, N) = x (M, K) times the scaled matrix (q, s) transposed, any M; q's
// integers as int8 (S8: N x K) or Q4_1's 0 to 15 two to a byte (U8: N x K / 2, with offsets).
template <ffi::DataType T>
ffi::Error RowsMatmulScaledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<T> q, ffi::Buffer<ffi::F16> s,
                                ffi::ResultBuffer<ffi::F32> y) {
#if MTPJAX_SCALED_FMA
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  const auto sd = s.dimensions();
  constexpr int64_t kPerByte = T == ffi::DataType::U8 ? 2 : 1;
  if (qd.size() != 2 || xd.size() < 1 || qd[1] * kPerByte != xd.back() || qd[0] % kRunRows ||
      xd.back() % kRun || sd.size() != 4 || sd[0] != qd[0] / kRunRows ||
      sd[1] != xd.back() / kRun || (sd[2] != 1 && sd[2] != 2) || sd[3] != kRunRows)
    return ffi::Error::InvalidArgument(
        "rows_matmul: x (..., K), scaled tiles q (N, K, or K / 2 for integers 0 to 15) and "
        "scales (N / 16, K / 32, 1 or 2, 16), N % 16 == 0 and K % 32 == 0, expected");
  const int64_t K = xd.back(), N = qd[0];
  const int64_t M = x.element_count() / std::max<int64_t>(K, 1);
  if (M == 0) return ffi::Error::Success();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.typed_data());
  using Q = std::conditional_t<T == ffi::DataType::U8, uint8_t, int8_t>;
  if (T == ffi::DataType::U8 && sd[2] != 2)
    return ffi::Error::InvalidArgument("rows_matmul: integers 0 to 15 come with offsets");
  const auto* qp = reinterpret_cast<const Q*>(q.typed_data());
  // on the tile unit where it runs, else on the FMAs
  const auto product = [&](auto affine) {
    constexpr bool kAffine = decltype(affine)::value;
#if MTPJAX_AMX
    if (TiledReady())
      return scaled_product<kAffine>(pool, x.typed_data(), M, K, N, qp, sp, y->typed_data());
#endif
    fma_scaled_product<kAffine>(pool, x.typed_data(), M, K, N, qp, sp, y->typed_data());
  };
  if (sd[2] == 2)
    product(std::true_type{});
  else
    product(std::false_type{});
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "rows_matmul: built without AVX-512 or AVX2");
#endif
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hmax(vf v) {  // the largest lane, by the same shuffle tree as hsum
  for (int h = kLanes / 2; h > 1; h /= 2) v = vmax(v, swapped(v, h));
  return std::max(v[0], v[1]);
}

// out[b, t, h] = softmax over the cache slots l that query (b, t) sees, of q[b, t, h] .
// k[b, l, h / G] (scaled by 1/sqrt(E)), times v[b, l, h / G]: one pass over the slots it sees,
// kLanes at a time, with a running maximum and sum per query head. The query at position p,
// stored at slot s, is the last of a run of r = p - (the row's lowest new position + 1) new
// entries (0 at least) in the slots up to s, and sees l < p - r or s - r <= l <= s
// (layers.visible_slots): a chain of new tokens sits at slot == pos (plain causal attention); a
// branch of drafts verified beside the chain sits past it, at the positions of the chain tokens
// it stands in for, and sees the committed prefix and itself. The pass takes the slots in the
// order of their positions, the prefix and then the run, so that a branch's entry is summed
// exactly as the chain's entry at its position would be, bit for bit: greedy decoding with
// branches commits `ar`'s tokens even where two logits differ by a rounding.
constexpr int kMaxQueries = 64, kMaxVectors = 128 / kLanes;  // per task: G query heads, E / kLanes

// One new position's G query heads (q: G x E, contiguous) over one kv head's cache (k, v: slot
// l at l * stride), written to out (G x E). EV = E / kLanes is fixed at compile time so that
// every loop over the head dimension unrolls: the values are summed in 2 x EV independent
// accumulators (even and odd slots), where one accumulator chain per vector made the sum wait
// on each multiply-add's latency.
template <int EV>
void attend_position(const float* q, const float* k, const float* v, float* out, int64_t G,
                     int64_t stride, int64_t before, int64_t first, int64_t own,
                     float scale) {
  constexpr int64_t E = EV * kLanes;
  // The slots seen, in order: [0, before), then [from, own] (from == before for a chain entry).
  const int64_t from = std::max(first, before);
  const int64_t seen = before + std::max<int64_t>(own + 1 - from, 0);
  float run_max[kMaxQueries], run_sum[kMaxQueries];
  vf acc[kMaxQueries][2][EV], qv[kMaxQueries][EV];
  for (int64_t i = 0; i < G; ++i) {
    run_max[i] = -INFINITY;
    run_sum[i] = 0.f;
    for (int e = 0; e < EV; ++e) {
      acc[i][0][e] = acc[i][1][e] = vf{};
      qv[i][e] = load(q + i * E + e * kLanes) * scale;
    }
  }
  for (int64_t l0 = 0; l0 < seen; l0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, seen - l0);
    int64_t at[kLanes];  // the cache offset of each seen slot of the block
    for (int64_t j = 0; j < n; ++j) {
      const int64_t l = l0 + j;
      at[j] = (l < before ? l : from + (l - before)) * stride;
    }
    const vi in_block = kIota < static_cast<int>(n);
    for (int64_t i = 0; i < G; ++i) {
      vf partial[kLanes];  // lane sums of q . k, one vector per seen slot of the block
      for (int64_t j = 0; j < kLanes; ++j) {
        vf s = vf{};
        if (j < n)  // past the last seen slot nothing is read
          for (int e = 0; e < EV; ++e) s = fma(qv[i][e], load(k + at[j] + e * kLanes), s);
        partial[j] = s;
      }
      const vf sv = in_block ? sums_of(partial) : splat(-INFINITY);
      const float block_max = hmax(sv);
      if (block_max == -INFINITY) continue;
      const float new_max = std::max(run_max[i], block_max);
      const float c = std::exp(run_max[i] - new_max);
      run_max[i] = new_max;
      const vf pv = exp_nonpositive(sv - new_max);
      run_sum[i] = run_sum[i] * c + hsum(pv);
      float p[kLanes];
      store(p, pv);
      vf a0[EV], a1[EV];
      for (int e = 0; e < EV; ++e) {
        a0[e] = acc[i][0][e] * c;
        a1[e] = acc[i][1][e] * c;
      }
      int64_t j = 0;
      for (; j + 1 < n; j += 2)
        for (int e = 0; e < EV; ++e) {
          a0[e] = fma(load(v + at[j] + e * kLanes), splat(p[j]), a0[e]);
          a1[e] = fma(load(v + at[j + 1] + e * kLanes), splat(p[j + 1]), a1[e]);
        }
      if (j < n)
        for (int e = 0; e < EV; ++e)
          a0[e] = fma(load(v + at[j] + e * kLanes), splat(p[j]), a0[e]);
      for (int e = 0; e < EV; ++e) {
        acc[i][0][e] = a0[e];
        acc[i][1][e] = a1[e];
      }
    }
  }
  for (int64_t i = 0; i < G; ++i) {
    const float inv = run_sum[i] > 0.f ? 1.0f / run_sum[i] : 0.f;
    for (int e = 0; e < EV; ++e)
      store(out + i * E + e * kLanes, (acc[i][0][e] + acc[i][1][e]) * inv);
  }
}

typedef void (*AttendFn)(const float*, const float*, const float*, float*, int64_t, int64_t,
                         int64_t, int64_t, int64_t, float);
template <size_t... I>
constexpr std::array<AttendFn, sizeof...(I)> attend_table(std::index_sequence<I...>) {
  return {attend_position<I + 1>...};
}
constexpr auto kAttend = attend_table(std::make_index_sequence<kMaxVectors>());

ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> slot,
                              ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();  // B, T, H, E
  const auto kd = k.dimensions();  // B, L, K, E
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("attention: ranks");
  const int64_t B = qd[0], T = qd[1], H = qd[2], E = qd[3], L = kd[1], KH = kd[2];
  if (E % kLanes || H % KH || E / kLanes > kMaxVectors || E == 0 || H / KH > kMaxQueries)
    return ffi::Error::InvalidArgument("attention: unsupported shape");
  const int64_t G = H / KH;
  const AttendFn attend = kAttend[E / kLanes - 1];
  const float scale = 1.0f / std::sqrt(static_cast<float>(E));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* pp = pos.typed_data();
  const int32_t* sp = slot.typed_data();
  float* op = out->typed_data();
  // One task per (row, kv head, new position): its G query heads. Tasks per kv head would leave
  // one of two threads idle half the time at batch 1 (3 kv heads).
  parallel(pool, B * KH * T, [&](int64_t task) {
    const int64_t b = task / (KH * T), kh = task / T % KH, t = task % T;
    const int64_t head = ((b * T + t) * H + kh * G) * E, cache = (b * L * KH + kh) * E;
    const int32_t* row_pos = pp + b * T;
    const int64_t lowest = *std::min_element(row_pos, row_pos + T);
    const int64_t run = std::max<int64_t>(row_pos[t] - lowest - 1, 0);
    const int64_t own = std::min<int64_t>(sp[b * T + t], L - 1);
    attend(qp + head, kp + cache, vp + cache, op + head, G, KH * E,
           std::min<int64_t>(row_pos[t] - run, L), own - run, own, scale);
  });
  return ffi::Error::Success();
}

// The first index of the largest value of each row of x (rows x V), the token layers.greedy
// takes: each lane keeps its first strictly larger value and its index, four vectors of lanes
// over the row in turn, then the largest of their values with the lowest index among equals.
// A row holding a NaN gives V - 1 (layers.greedy gives some valid id there). XLA's CPU backend
// takes greedy's max and then the first index holding it at about a nanosecond an entry
// (experiments/argmax.py: 168 us for a 4-position verify over SmolLM2's 49152 tokens, 13 us
// here).
void argmax_row(const float* x, int64_t V, int32_t* out) {
  constexpr int kSets = 4;
  vf best[kSets];
  vi at[kSets], nan = {};
  for (int s = 0; s < kSets; ++s) {
    best[s] = splat(-INFINITY);
    at[s] = vi{};
  }
  int64_t i = 0;
  for (; i + kSets * kLanes <= V; i += kSets * kLanes)
    for (int s = 0; s < kSets; ++s) {
      const vf v = load(x + i + s * kLanes);
      const vi larger = v > best[s];
      nan |= v != v;
      best[s] = larger ? v : best[s];
      at[s] = larger ? kIota + static_cast<int>(i + s * kLanes) : at[s];
    }
  float top = -INFINITY;
  int64_t index = 0;  // a row of -inf: 0
  bool seen_nan = false;
  const auto take = [&](float value, int64_t j) {
    if (value > top || (value == top && j < index)) top = value, index = j;
  };
  for (int s = 0; s < kSets; ++s)
    for (int l = 0; l < kLanes; ++l) take(best[s][l], at[s][l]);
  for (int l = 0; l < kLanes; ++l) seen_nan |= nan[l] != 0;
  for (; i < V; ++i) {
    take(x[i], i);
    seen_nan |= std::isnan(x[i]);
  }
  *out = static_cast<int32_t>(seen_nan ? V - 1 : index);
}

ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() < 1 || xd.back() > INT32_MAX)
    return ffi::Error::InvalidArgument("argmax: x (..., V), 1 <= V < 2^31");
  const int64_t V = xd.back(), rows = x.element_count() / V;
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  // A row of 49152 takes a few microseconds: threads only where there is more than a
  // threaded call's own cost of work (about 3 such rows).
  if (rows * V < (int64_t{1} << 17)) {
    for (int64_t r = 0; r < rows; ++r) argmax_row(xp + r * V, V, op + r);
  } else {
    parallel(pool, rows, [&](int64_t r) { argmax_row(xp + r * V, V, op + r); });
  }
  return ffi::Error::Success();
}

// The sum of the squares of x[0..n) in layers.row_sums's order, with buf (n + 1 floats) to work
// in: halved while n is even or past 16 (a zero added to an odd n first), then what is left added
// in turn. Each product and add rounded on its own (the library is built with -ffp-contract=off),
// in an order that does not depend on the number of rows. (row_sums(x * x) in XLA takes the same
// order, but XLA lets LLVM fuse a square and an add into one multiply-add where it optimises, so
// its last bit may differ.)
float square_sum(const float* x, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = x[i] * x[i];
  while (n > 16 || (n % 2 == 0 && n > 1)) {
    if (n % 2) buf[n++] = 0.0f;
    const int64_t half = n / 2;
    for (int64_t i = 0; i < half; ++i) buf[i] = buf[i] + buf[i + half];
    n = half;
  }
  float total = buf[0];
  for (int64_t j = 1; j < n; ++j) total = total + buf[j];
  return total;
}

ffi::Error SquareSumsImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() < 1)
    return ffi::Error::InvalidArgument("square_sums: x (..., N), N >= 1");
  const int64_t N = xd.back(), rows = x.element_count() / N;
  std::vector<float> buf(N + 1);
  for (int64_t r = 0; r < rows; ++r)
    out->typed_data()[r] = square_sum(x.typed_data() + r * N, N, buf.data());
  return ffi::Error::Success();
}

}  // namespace

// The row kernels' bindings: x (float32) and a weight buffer of type W, then (scaled tiles) the
// integers' float16 scales, to y (float32).
template <ffi::DataType W>
auto weights_binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<W>>();
}
template <ffi::DataType W>
auto rows_binding() {
  return weights_binding<W>().template Ret<ffi::Buffer<ffi::F32>>();
}
template <ffi::DataType W>
auto scaled_binding() {
  return weights_binding<W>()
      .template Arg<ffi::Buffer<ffi::F16>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmul, RowsMatmulImpl<ffi::F32>, rows_binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmulBf16, RowsMatmulImpl<ffi::BF16>, rows_binding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmulS8, RowsMatmulImpl<ffi::S8>, rows_binding<ffi::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmulTiled, RowsMatmulTiledImpl, rows_binding<ffi::U32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmulScaledS8, RowsMatmulScaledImpl<ffi::S8>,
                              scaled_binding<ffi::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmulScaled8, RowsMatmulScaledImpl<ffi::U8>,
                              scaled_binding<ffi::U8>());

// 1 when tiled products can run here: built for AMX, and the kernel let this process use the
// tile registers (Linux asks each process to request them once). Declared near the top, for the
// scaled products, which fall back to FMAs where it is 0.
extern "C" int TiledReady() {
#if MTPJAX_AMX
  static const int ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                   18 /* XFEATURE_XTILEDATA */) == 0;
  return ready;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacheAttention, CacheAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Argmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SquareSums, SquareSumsImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// 1 when scaled products (kernels.ScaledTiles) run here: on the tile unit where TiledReady, else
// on the FMAs of AVX-512 or AVX2 (with F16C).
extern "C" int ScaledReady() {
#if MTPJAX_SCALED_FMA
  return 1;
#else
  return 0;
#endif
}
