// The loop of jaxchar's CPU generation kernel, without XLA: the LSTM cells, the head and
// the draw, split over threads by hidden unit. Included by jaxchar/csrc/native.cc (the XLA FFI
// handler) and by benchmarks/native_loop.cc (the same loop run stand-alone, to measure what
// JAX and XLA add around it). See native.cc for the layout of a Problem's arrays.
#ifndef JAXCHAR_LSTM_LOOP_H_
#define JAXCHAR_LSTM_LOOP_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace jaxchar {

constexpr int kTile = 64;  // columns a thread accumulates at once: 4 gates x 16 units

// 2^y for y in [-126, 126] (clamped there): 2^k * 2^f with k = round(y), f in [-1/2, 1/2],
// and 2^f by a degree-6 polynomial fitted in numpy (least squares of the relative error at
// 400 Chebyshev nodes; relative error < 2e-9). Plain arithmetic, so that the compiler
// vectorizes the gate loops.
inline float exp2_approx(float y) {
  y = std::min(std::max(y, -126.0f), 126.0f);
  const float k = std::nearbyint(y), f = y - k;
  const float p = 1.0f + f * (6.931472056e-1f + f * (2.402264661e-1f + f * (5.550328998e-2f +
                  f * (9.618519534e-3f + f * (1.339986036e-3f + f * 1.533757684e-4f)))));
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / (1 + e^-v) and tanh(x) = 2 / (1 + e^-2x) - 1; absolute errors below 1e-7 and 2e-7
// against float64 (float32 rounding near 1 is 6e-8). These replaced a tanh from exp(-2|x|)
// with its sign restored and the sigmoid as 0.5 tanh(v / 2) + 1/2: 17% less time in the
// cell update (fewer operations per value), which is ~9% of a batch-64 generation step.
inline float sigmoid_approx(float v) { return 1.0f / (1.0f + exp2_approx(-1.44269504f * v)); }
inline float tanh_approx(float x) { return 2.0f / (1.0f + exp2_approx(-2.88539008f * x)) - 1.0f; }

template <bool kHardSigmoid>
inline float gate(float v) {
  if constexpr (kHardSigmoid) return std::clamp(0.2f * v + 0.5f, 0.0f, 1.0f);  // Keras 1's
  return sigmoid_approx(v);
}

// the LSTM update of `units` cells from their pre-activations, z [4 x units] (i, f, g, o: the
// recurrent products) plus x (the input's contribution and the bias, gate g's at x + g x_gate)
template <bool kHardSigmoid>
void update(const float* __restrict z, const float* __restrict x, int x_gate,
            float* __restrict c, float* __restrict h, int units) {
  for (int u = 0; u < units; u++) {
    const float i = gate<kHardSigmoid>(z[u] + x[u]), f = gate<kHardSigmoid>(z[units + u] + x[x_gate + u]);
    const float g = tanh_approx(z[2 * units + u] + x[2 * x_gate + u]);
    const float o = gate<kHardSigmoid>(z[3 * units + u] + x[3 * x_gate + u]);
    c[u] = f * c[u] + i * g;
    h[u] = o * tanh_approx(c[u]);
  }
}

#ifdef __AVX512F__
// The same on 16 lanes with AVX-512's scalef for the 2^k (one instruction for the four that
// build it from its bits, and no clamp: it saturates to 0 and infinity, which the divisions
// below turn into the right limits). The values are those of the plain functions wherever
// their clamp does not apply (|y| <= 126).
inline __m512 exp2_16(__m512 y) {
  const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, k);
  __m512 p = _mm512_set1_ps(1.533757684e-4f);
  for (float coefficient : {1.339986036e-3f, 9.618519534e-3f, 5.550328998e-2f, 2.402264661e-1f,
                            6.931472056e-1f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(coefficient));
  return _mm512_scalef_ps(p, k);
}

inline __m512 sigmoid_16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp2_16(_mm512_mul_ps(v, _mm512_set1_ps(-1.44269504f)));
  return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

inline __m512 tanh_16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(-2.88539008f)));
  return _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)), one);
}

// units % 16 == 0 (the generation kernel's units are: hidden % (16 x threads) == 0). Same
// values as the plain loop above, in fewer instructions than g++'s vectorization of it
// (docs/benchmarks.md).
template <>
inline void update<false>(const float* __restrict z, const float* __restrict x, int x_gate,
                          float* __restrict c, float* __restrict h, int units) {
  auto in = [&](int g, int u) {
    return _mm512_add_ps(_mm512_loadu_ps(z + g * units + u), _mm512_loadu_ps(x + g * x_gate + u));
  };
  for (int u = 0; u < units; u += 16) {
    const __m512 i = sigmoid_16(in(0, u)), f = sigmoid_16(in(1, u));
    const __m512 g = tanh_16(in(2, u)), o = sigmoid_16(in(3, u));
    const __m512 cu = _mm512_fmadd_ps(f, _mm512_loadu_ps(c + u), _mm512_mul_ps(i, g));
    _mm512_storeu_ps(c + u, cu);
    _mm512_storeu_ps(h + u, _mm512_mul_ps(o, tanh_16(cu)));
  }
}
#endif

// Sense-reversing barrier that spins briefly, then sleeps. On a quiet machine every thread
// arrives within a microsecond or two of the others and the spin catches it (~0.1 us a
// wait). When another process holds a core, a late thread may be off the CPU for a whole
// scheduler slice (milliseconds): a waiter that kept spinning would take the very core the
// late thread needs (and our process's share of the CPU), so after `spin` it sleeps on the
// sense word (a futex on Linux, C++20 atomic wait) and the last thread to arrive wakes it.
//
// The spin must outlast a futex wake-up on a virtual machine (tens to hundreds of us) where
// steps are short: with one row a step is ~4 us, and with a 50 us spin one late wake-up made
// the partner sleep at the next barrier, and so on, a convoy that ran the loop at a tenth of
// its speed (kShortSteps). Steps of many rows (training, generation from 12 rows) take
// 100 us or more, a late wake-up is a small share of one, and a short spin (kLongSteps)
// wastes less of a loaded machine's time.
class Barrier {
 public:
  static constexpr std::chrono::microseconds kShortSteps{500}, kLongSteps{50};
  Barrier(int n, std::chrono::microseconds spin) : n_(n), spin_(spin) {}
  void wait(int& sense) {
    sense ^= 1;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      rounds_.store(rounds_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      // seq_cst on sense_ and sleepers_ (here and below): a waiter either sees the new sense
      // or is counted before this load sees sleepers_, never neither
      sense_.store(sense);
      if (sleepers_.load() > 0) sense_.notify_all();
      return;
    }
    const auto start = std::chrono::steady_clock::now(), until = start + spin_;
    for (int tries = 1;; tries++) {
      if (sense_.load(std::memory_order_acquire) == sense) {
        if (tries > 256 && std::chrono::steady_clock::now() - start > kLate) late();
        return;
      }
      if (tries % 256 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    sleepers_.fetch_add(1);
    for (int old; (old = sense_.load()) != sense;) sense_.wait(old);
    sleepers_.fetch_sub(1);
    late();
  }
  // waits that lasted over kLate: a sign that a partner thread was off its core
  int late_waits() const { return late_.load(std::memory_order_relaxed); }
  static constexpr std::chrono::microseconds kLate{100};

 private:
  void late() {  // (the first kWarm rounds start cold: caches, threads waking; not counted)
    if (rounds_.load(std::memory_order_relaxed) >= kWarm)
      late_.fetch_add(1, std::memory_order_relaxed);
  }
  static constexpr int kWarm = 64;
  const int n_;
  const std::chrono::microseconds spin_;
  // on a cache line of their own: a neighbour read at every step (the Shared's vector, a
  // caller's locals) would otherwise bounce between the cores with them
  alignas(64) std::atomic<int> arrived_{0};
  std::atomic<int> sense_{0};
  std::atomic<int> sleepers_{0};
  char pad_[64 - 3 * sizeof(std::atomic<int>)];
  std::atomic<int> late_{0}, rounds_{0};
};

// Below this many rows a generation step is a few microseconds (matrix-vector products); from
// it on the recurrent products run by Strassen's algorithm and a step is 100 us or more.
constexpr int kFewRows = 12;

struct Problem {
  int layers, hidden, vocab, batch, prompt_length, steps, threads;
  const int32_t* prompt;
  int64_t gate_activation;  // 0 sigmoid, 1 hard_sigmoid
  const float *recurrent, *upper, *upper_bias, *table, *head, *head_bias;
  const float *c0, *h0, *logits0, *noise;
  float temperature;
  bool bf16 = false;  // the LSTM products in bfloat16, float32 sums (model.dtype bfloat16)
  int32_t* ids;
  float *c_out, *h_out, *logits_out;
};

// the first 64-byte boundary in `v`, which has 16 floats to spare
inline float* line_aligned(std::vector<float>& v) {
  return v.data() + (-reinterpret_cast<uintptr_t>(v.data()) % 64) / sizeof(float);
}

struct Shared {
  explicit Shared(const Problem& p)
      : barrier(p.threads, p.batch < kFewRows ? Barrier::kShortSteps : Barrier::kLongSteps),
        h_storage(2 * p.layers * p.batch * p.hidden + 16),
        storage(2 * p.threads * p.batch * padded(p.vocab) + 16) {
    std::copy(p.h0, p.h0 + p.layers * p.batch * p.hidden, h());  // time parity 0
  }
  Barrier barrier;
  // [2, L, B, H]: the hidden states of two consecutive steps, from a 64-byte boundary, so
  // that where H / threads is a multiple of 16 no cache line holds two threads' units (no
  // gain measurable in the batch-64 loop, but no line is written by both cores either)
  float* h() { return line_aligned(h_storage); }
  // [2, threads, B, padded(V)]: each thread's share of the logits at two consecutive steps
  // (each on cache lines of its own)
  float* partial() { return line_aligned(storage); }
  static int padded(int vocab) { return (vocab + 15) / 16 * 16; }
  std::vector<float> h_storage, storage;
};

// 16 floats as one value (a zmm register with AVX-512; two or four narrower ones without):
// g++ kept the plain-array sums of the 1-row case in memory once the batch loop existed
typedef float Vec16 __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int kVecs = kTile / 16;

// Keeps a loaded value in a register: g++ otherwise folds the load into every multiply-add
// that uses it, loading each weight once per row of the batch, which made the loads, not
// the arithmetic, the limit (an empty asm that claims to change the register).
inline void in_register(Vec16& v) {
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// f(std::integral_constant<int, n>()) for n in [1, 6]: the row-block kernels below are
// templates on their row count, so that their sums stay in registers
template <class F>
inline void with_rows(int n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    default: f(std::integral_constant<int, 6>()); break;
  }
}

// a thread's share of the logits for B rows: out[b, v] = sum over its units u of
// h[b, u] * w[u, v], with w packed [units, vp], vp a multiple of 16 (zero beyond the
// vocabulary), summed in registers for blocks of up to 6 rows and 64 columns, so that no
// thread computes all of the head from all of h with its sums going through memory.
template <int kRows, int kWidth>
inline void head_block(const float* __restrict w, int vp, const float* __restrict h,
                       int h_stride, int units, float* __restrict out, int out_stride) {
  constexpr int kV = kWidth / 16;
  Vec16 acc[kRows][kV] = {};
  for (int u = 0; u < units; u++, w += vp) {
    Vec16 wr[kV];
    for (int j = 0; j < kV; j++) wr[j] = reinterpret_cast<const Vec16*>(w)[j];
    for (int b = 0; b < kRows; b++) {
      const float hb = h[b * h_stride + u];
      for (int j = 0; j < kV; j++) acc[b][j] += hb * wr[j];
    }
  }
  for (int b = 0; b < kRows; b++)
    for (int j = 0; j < kV; j++) reinterpret_cast<Vec16*>(out + b * out_stride)[j] = acc[b][j];
}

template <int kRows>
inline void head_rows(const float* w, int vp, const float* h, int h_stride, int units,
                      float* out) {
  int col = 0;
  for (; col + 64 <= vp; col += 64)
    head_block<kRows, 64>(w + col, vp, h, h_stride, units, out + col, vp);
  switch (vp - col) {
    case 48: head_block<kRows, 48>(w + col, vp, h, h_stride, units, out + col, vp); break;
    case 32: head_block<kRows, 32>(w + col, vp, h, h_stride, units, out + col, vp); break;
    case 16: head_block<kRows, 16>(w + col, vp, h, h_stride, units, out + col, vp); break;
  }
}

// rows of h `h_stride` apart, rows of out [rows, vp]
inline void head_share(const float* w, int vp, const float* h, int h_stride, int units,
                       int rows, float* out) {
  for (int b = 0; b < rows; b += 6, h += 6 * h_stride, out += 6 * vp)
    with_rows(std::min(rows - b, 6), [&](auto n) {
      head_rows<decltype(n)::value>(w, vp, h, h_stride, units, out);
    });
}

// row b's next character from its logits
inline int draw(const Problem& p, const float* logits, int step, int b) {
  int best = 0;
  if (p.temperature > 0.0f) {  // as sample_logits: categorical(logits / temperature)
    const float t = std::max(p.temperature, 1e-6f);
    const float* g = p.noise + (static_cast<int64_t>(step) * p.batch + b) * p.vocab;
    float top = logits[0] / t + g[0];
    for (int v = 1; v < p.vocab; v++) {
      float s = logits[v] / t + g[v];
      if (s > top) top = s, best = v;
    }
  } else {
    for (int v = 1; v < p.vocab; v++)
      if (logits[v] > logits[best]) best = v;
  }
  return best;
}

// z[b, tile] += x[b, :rows] @ w for kRows rows of the batch at once: each weight loaded is
// used kRows times, and the kRows x 4 sums stay in registers (w: one packed tile)
template <int kRows>
inline void tile_rows(const float* __restrict w, int rows, const float* __restrict x,
                      int x_stride, float* __restrict z, int z_stride) {
  Vec16 acc[kRows][kVecs];
  for (int b = 0; b < kRows; b++)
    for (int j = 0; j < kVecs; j++) acc[b][j] = reinterpret_cast<const Vec16*>(z + b * z_stride)[j];
  for (int r = 0; r < rows; r++, w += kTile) {
    Vec16 wr[kVecs];  // loaded once for all the rows
    for (int j = 0; j < kVecs; j++) {
      wr[j] = reinterpret_cast<const Vec16*>(w)[j];
      if constexpr (kRows > 1) in_register(wr[j]);  // one row: better folded (measured)
    }
    for (int b = 0; b < kRows; b++) {
      const float xr = x[b * x_stride + r];
      for (int j = 0; j < kVecs; j++) acc[b][j] += xr * wr[j];
    }
  }
  for (int b = 0; b < kRows; b++)
    for (int j = 0; j < kVecs; j++) reinterpret_cast<Vec16*>(z + b * z_stride)[j] = acc[b][j];
}

constexpr int kBlock = 6;  // rows of the batch that share each weight loaded

// z[b, :] += sum over r < rows of x[b, r] * w[r, :] for a block of up to kBlock rows b, for
// every tile of a kernel packed [tiles][rows][kTile], its tiles `tile_stride` floats apart
inline void block_product(const float* w, int rows, size_t tile_stride, int tiles,
                          const float* x, int x_stride, float* z, int z_stride, int block) {
  for (int tile = 0; tile < tiles; tile++) {
    const float* wt = w + tile * tile_stride;
    float* zt = z + tile * kTile;
    with_rows(block, [&](auto n) {
      tile_rows<decltype(n)::value>(wt, rows, x, x_stride, zt, z_stride);
    });
  }
}

// z[B, cols] += x[B, :rows] @ w, the batch in blocks of kBlock rows. Not inlined: inlined
// into work, g++ keeps two of tile_rows<6>'s weight registers on the stack and stores them at
// every row of the weights.
[[gnu::noinline]] inline void product(const float* w, size_t tile_stride, int rows,
                                      const float* x, int x_stride, int B, float* z, int cols,
                                      int tiles) {
  for (int b = 0; b < B; b += kBlock)
    block_product(w, rows, tile_stride, tiles, x + b * x_stride, x_stride, z + b * cols, cols,
                  std::min(B - b, kBlock));
}

// One tile of one of Strassen's seven products for kBlock rows of the batch, added to one or
// two destinations: d1 += s1 * x @ w and d2 += s2 * x @ w, with w = w1, w1 + w2 or w1 - w2
// (kOp 0, 1, -1), the sum formed as each row of the weights is loaded (the add runs beside
// the multiply-adds; stored sums would not fit in the core's L2 with the weights)
template <int kOp>
inline void tile_strassen(const float* __restrict w1, const float* __restrict w2, int rows,
                          const float* __restrict x, int x_stride, float* d1, float s1, float* d2,
                          float s2, int z_stride, int stores) {
  Vec16 acc[kBlock][kVecs];
  for (int b = 0; b < kBlock; b++)
    for (int j = 0; j < kVecs; j++) acc[b][j] = Vec16{};
  int r = 0;
  do {  // rows > 0: with a for loop, g++ kept the sums on the stack for the case of none
    Vec16 wr[kVecs];
    for (int j = 0; j < kVecs; j++) {
      wr[j] = reinterpret_cast<const Vec16*>(w1)[j];
      if constexpr (kOp == 1) wr[j] += reinterpret_cast<const Vec16*>(w2)[j];
      if constexpr (kOp == -1) wr[j] -= reinterpret_cast<const Vec16*>(w2)[j];
      in_register(wr[j]);
    }
    for (int b = 0; b < kBlock; b++) {
      const float xr = x[b * x_stride + r];
      for (int j = 0; j < kVecs; j++) acc[b][j] += xr * wr[j];
    }
    w1 += kTile, w2 += kTile;
  } while (++r < rows);
  // the first `stores` destinations are set, the others added to (no lambda over acc here:
  // g++ then kept the sums in memory, and the products took twice as long)
  for (int d = 0; d < (d2 ? 2 : 1); d++) {
    float* out = d == 0 ? d1 : d2;
    const float sign = d == 0 ? s1 : s2;
    if (d < stores) {
      for (int b = 0; b < kBlock; b++)
        for (int j = 0; j < kVecs; j++)
          reinterpret_cast<Vec16*>(out + b * z_stride)[j] = sign * acc[b][j];
    } else {
      for (int b = 0; b < kBlock; b++)
        for (int j = 0; j < kVecs; j++)
          reinterpret_cast<Vec16*>(out + b * z_stride)[j] += sign * acc[b][j];
    }
  }
}

// How many of B rows strassen_product takes (0: none): two halves of whole blocks of rows,
// where the inputs (K) and each thread's tiles split in two halves
inline int strassen_rows(int B, int K, int tiles) {
  return K % 2 == 0 && tiles % 2 == 0 ? B / (2 * kBlock) * 2 * kBlock : 0;
}

// z[:S] = x[:S, :K] @ w (or += with `add`) as product does it, by one level of Strassen's
// algorithm: x and w each as 2 x 2 blocks, seven block products where there were eight
// (12.5% fewer multiply-adds). The weights' sums are formed in the tile kernel, the inputs'
// five in `sums` (5 x S/2 x K/2 floats), and each product goes straight into its blocks of
// z, the first into each block setting it unless `add`.
[[gnu::noinline]] inline void strassen_product(const float* w, size_t tile_stride, int K,
                                               const float* x, int x_stride, int S, float* z,
                                               int cols, int tiles, float* sums, bool add) {
  const int m = S / 2, k = K / 2, half = tiles / 2;
  const float *a11 = x, *a12 = x + k, *a21 = x + m * x_stride, *a22 = a21 + k;
  float *s1 = sums, *s2 = s1 + m * k, *s5 = s2 + m * k, *s6 = s5 + m * k, *s7 = s6 + m * k;
  auto sum = [k](const float* __restrict a, float sign, const float* __restrict b,
                 float* __restrict out) {  // restrict: else g++ leaves the loop scalar
    for (int r = 0; r < k; r++) out[r] = a[r] + sign * b[r];
  };
  for (int b = 0; b < m; b++) {
    const int i = b * x_stride, o = b * k;
    sum(a11 + i, 1, a22 + i, s1 + o), sum(a21 + i, 1, a22 + i, s2 + o);
    sum(a11 + i, 1, a12 + i, s5 + o), sum(a21 + i, -1, a11 + i, s6 + o);
    sum(a12 + i, -1, a22 + i, s7 + o);
  }
  const float *b11 = w, *b12 = w + half * tile_stride, *b21 = w + k * kTile, *b22 = b12 + k * kTile;
  float *c11 = z, *c12 = z + half * kTile, *c21 = z + m * cols, *c22 = c21 + half * kTile;
  auto run = [&](auto op, const float* w1, const float* w2, const float* xs, int stride,
                 float* d1, float sign1, float* d2, float sign2, int first_touches = 0) {
    for (int b = 0; b < m; b += kBlock)
      for (int t = 0; t < half; t++)
        tile_strassen<decltype(op)::value>(w1 + t * tile_stride, w2 + t * tile_stride, k,
                                           xs + b * stride, stride, d1 + b * cols + t * kTile,
                                           sign1, d2 ? d2 + b * cols + t * kTile : nullptr,
                                           sign2, cols, add ? 0 : first_touches);
  };
  using Sum = std::integral_constant<int, 1>;
  using Difference = std::integral_constant<int, -1>;
  using One = std::integral_constant<int, 0>;
  // the seven products, in the order that sets each block of z by its first (C11 and C22 by
  // the first, C21 by the second, C12 by the third)
  run(Sum(), b11, b22, s1, k, c11, 1, c22, 1, 2);                 // (A11 + A22)(B11 + B22)
  run(One(), b11, b11, s2, k, c21, 1, c22, -1, 1);                // (A21 + A22) B11
  run(Difference(), b12, b22, a11, x_stride, c12, 1, c22, 1, 1);  // A11 (B12 - B22)
  run(Difference(), b21, b11, a22, x_stride, c11, 1, c21, 1);     // A22 (B21 - B11)
  run(One(), b22, b22, s5, k, c11, -1, c12, 1);                   // (A11 + A12) B22
  run(Sum(), b11, b12, s6, k, c22, 1, nullptr, 0);                // (A21 - A11)(B11 + B12)
  run(Sum(), b21, b22, s7, k, c11, 1, nullptr, 0);                // (A12 - A22)(B21 + B22)
}

#ifdef __AVX512BF16__
constexpr bool kHasBf16 = true;

// tile_rows in bfloat16: w packed [pairs][kTile] of (row 2r, row 2r + 1) bfloat16 pairs, x
// [kRows][pairs] the same pairs of each row's inputs; float32 sums, as XLA's bfloat16 products
// with a float32 result. vdpbf16ps does two of tile_rows' multiply-adds per instruction
template <int kRows>
inline void tile_rows_bf16(const uint32_t* __restrict w, int pairs, const uint32_t* __restrict x,
                           int x_stride, float* __restrict z, int z_stride) {
  __m512 acc[kRows][kVecs];
  for (int b = 0; b < kRows; b++)
    for (int j = 0; j < kVecs; j++) acc[b][j] = _mm512_loadu_ps(z + b * z_stride + 16 * j);
  for (int r = 0; r < pairs; r++, w += kTile) {
    __m512bh wr[kVecs];
    for (int j = 0; j < kVecs; j++) {
      wr[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + 16 * j));
      asm("" : "+v"(wr[j]));  // loaded once for all the rows (see in_register)
    }
    for (int b = 0; b < kRows; b++) {
      const auto xr = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[b * x_stride + r]));
      for (int j = 0; j < kVecs; j++) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], xr, wr[j]);
    }
  }
  for (int b = 0; b < kRows; b++)
    for (int j = 0; j < kVecs; j++) _mm512_storeu_ps(z + b * z_stride + 16 * j, acc[b][j]);
}

// n floats (n % 32 == 0) to bfloat16, rounding to nearest even, two to a uint32
inline void to_bf16(const float* from, uint32_t* to, int n) {
  for (int i = 0; i < n; i += 32) {
    const __m512bh v =
        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(from + i + 16), _mm512_loadu_ps(from + i));
    _mm512_storeu_si512(to + i / 2, reinterpret_cast<__m512i>(v));
  }
}

[[gnu::noinline]] inline void product_bf16(const std::vector<uint32_t>& w16, int rows,
                                           const uint32_t* x16, int B, int H, float* z, int cols,
                                           int tiles) {
  for (int tile = 0; tile < tiles; tile++) {
    const uint32_t* w = &w16[static_cast<size_t>(tile) * rows / 2 * kTile];
    for (int b = 0; b < B; b += 6) {
      const uint32_t* xb = x16 + b * H;
      float* zb = z + b * cols + tile * kTile;
      with_rows(std::min(B - b, 6), [&](auto n) {
        tile_rows_bf16<decltype(n)::value>(w, rows / 2, xb, H, zb, cols);
      });
    }
  }
}
#else
constexpr bool kHasBf16 = false;
#endif

inline void work(const Problem& p, Shared& s, int t) {
  const int H = p.hidden, L = p.layers, units = H / p.threads, first = t * units;
  const int cols = 4 * units, tiles = cols / kTile;
  std::vector<int> source_col(cols);  // where this thread's column k sits in the 4H gates
  for (int k = 0; k < cols; k++) source_col[k] = (k / units) * H + first + k % units;
  // this thread's columns of every layer, tile by tile, each tile contiguous over the rows
  // (layer 0: the recurrent kernel's H rows; above: the input kernel's H, then those)
  std::vector<std::vector<float>> packed(L);
  for (int l = 0; l < L; l++) {
    const int rows = l == 0 ? H : 2 * H;
    packed[l].resize(static_cast<size_t>(rows) * cols);
    for (int r = 0; r < rows; r++) {  // row by row: each source row is read in order
      const float* from =
          l == 0 || r >= H ? p.recurrent + (static_cast<int64_t>(l) * H + r % H) * 4 * H
                           : p.upper + (static_cast<int64_t>(l - 1) * H + r) * 4 * H;
      for (int k = 0; k < cols;) {  // in runs of columns that are adjacent in both layouts
        const int run = std::min(units - k % units, kTile - k % kTile);
        std::copy(from + source_col[k], from + source_col[k] + run,
                  &packed[l][(static_cast<size_t>(k / kTile) * rows + r) * kTile + k % kTile]);
        k += run;
      }
    }
  }
#ifdef __AVX512BF16__
  // in bfloat16: each tile's rows in pairs, [tiles][rows / 2][kTile] of (row 2r, row 2r + 1)
  std::vector<std::vector<uint32_t>> packed16(p.bf16 ? L : 0);
  for (int l = 0; l < static_cast<int>(packed16.size()); l++) {
    const int rows = l == 0 ? H : 2 * H;
    std::vector<float> pair(2 * kTile);
    packed16[l].resize(static_cast<size_t>(rows) / 2 * cols);
    for (int tile = 0; tile < tiles; tile++)
      for (int r = 0; r < rows; r += 2) {
        const float* from = &packed[l][(static_cast<size_t>(tile) * rows + r) * kTile];
        for (int k = 0; k < kTile; k++) pair[2 * k] = from[k], pair[2 * k + 1] = from[kTile + k];
        to_bf16(pair.data(), &packed16[l][(static_cast<size_t>(tile) * rows + r) / 2 * kTile],
                2 * kTile);
      }
  }
  std::vector<uint32_t> x16(p.bf16 ? static_cast<size_t>(p.batch) * p.hidden : 0);
#endif
  // this thread's rows of the head, [units, vp], zero beyond the vocabulary, from a 64-byte
  // boundary (with a row's 3 loads to 12 multiply-adds, loads split over two cache lines
  // made one thread's share take ~45% longer than the other's)
  const int V = p.vocab, vp = Shared::padded(V), T = p.threads;
  std::vector<float> head_storage(static_cast<size_t>(units) * vp + 16, 0.0f);
  float* head = line_aligned(head_storage);
  for (int u = 0; u < units; u++)
    std::copy(p.head + static_cast<int64_t>(first + u) * V,
              p.head + static_cast<int64_t>(first + u + 1) * V, &head[u * vp]);
  // per row b of the batch: c [L, B, units], z [B, cols], logits [B, V]
  const int B = p.batch, P = p.prompt_length, N = p.steps;
  std::vector<float> c(static_cast<size_t>(L) * B * units), z(static_cast<size_t>(B) * cols);
  std::vector<float> sums_storage(5 * (B / 2) * (H / 2));  // strassen_product's
  float* sums = sums_storage.data();
  // each thread computes its units' share of the logits before the barrier; after it, every
  // thread adds the shares (the same sums in the same order) and draws the same characters:
  // no second barrier to hand them over, and no thread idle while one works
  std::vector<float> logits(p.logits0, p.logits0 + B * V);
  std::vector<int> next(B);
  for (int lb = 0; lb < L * B; lb++)
    std::copy(p.c0 + lb * H + first, p.c0 + lb * H + first + units, &c[lb * units]);

  int sense = 0;
  const int total = P + N;
  for (int n = 0; n < total; n++) {
    const int drawn = n - P;  // < 0 while reading the prompt
    float* prev = s.h() + (n % 2) * L * B * H;
    float* cur = s.h() + ((n + 1) % 2) * L * B * H;
    for (int b = 0; b < B; b++) {
      next[b] = drawn < 0 ? p.prompt[b * P + n] : draw(p, &logits[b * V], drawn, b);
      if (t == 0 && drawn >= 0) p.ids[static_cast<int64_t>(b) * N + drawn] = next[b];
    }
    for (int l = 0; l < L; l++) {
      // the layer's inputs, each [B, H]: the last step's h of the layer, and for l > 0 first
      // this step's h of the layer below (the rows of the packed kernels in that order)
      const float* own = prev + l * B * H;
      const float* below = l > 0 ? cur + (l - 1) * B * H : nullptr;
      // z = the recurrent products (rows [0, S) set by Strassen's first product, the others
      // summed from zero); the update adds the input's contribution, which the products do
      // not need (no copy of it into z)
      const int S = p.bf16 ? 0 : strassen_rows(B, H, tiles);
      std::fill(z.begin() + static_cast<size_t>(S) * cols, z.end(), 0.0f);
#ifdef __AVX512BF16__
      if (p.bf16) {
        const int rows = l == 0 ? H : 2 * H;
        for (int b = 0; b < B; b++) {
          if (l > 0) to_bf16(below + b * H, &x16[b * H], H);
          to_bf16(own + b * H, &x16[b * H + (rows - H) / 2], H);
        }
        product_bf16(packed16[l], rows, x16.data(), B, H, z.data(), cols, tiles);
      }
#endif
      if (!p.bf16) {  // straight from the shared h, no copy
        const float* w = packed[l].data();
        const int stride = (l == 0 ? H : 2 * H) * kTile;  // from one tile to the next
        bool add = false;  // to the first call's products
        for (const float* x : {below, own}) {
          if (!x) continue;
          float* zs = z.data() + S * cols;  // the rows after Strassen's
          if (S > 0) strassen_product(w, stride, H, x, H, S, z.data(), cols, tiles, sums, add);
          if (S < B) product(w, stride, H, x + S * H, H, B - S, zs, cols, tiles);
          add = true;
          w += H * kTile;  // the next rows of the kernel
        }
      }
      auto cell_update = p.gate_activation == 1 ? update<true> : update<false>;
      for (int b = 0; b < B; b++) {  // the input's contribution: the table's row, or the bias
        const float* x = l == 0 ? p.table + static_cast<int64_t>(next[b]) * 4 * H
                                : p.upper_bias + (l - 1) * 4 * H;
        cell_update(&z[b * cols], x + first, H, &c[(l * B + b) * units],
                    cur + (l * B + b) * H + first, units);
      }
      if (l == L - 1 && n >= P - 1)  // the logits are needed after this step
        head_share(head, vp, cur + l * B * H + first, H, units, B,
                   &s.partial()[((n % 2) * T + t) * B * vp]);
      s.barrier.wait(sense);  // the layer's new h (and the shares of the logits) complete
    }
    if (n >= P - 1) {  // every thread adds the shares in the same order
      for (int b = 0; b < B; b++) {  // (the share loop outside, so that v's vectorizes)
        const float* share = &s.partial()[((n % 2) * T * B + b) * vp];
        float* __restrict sum = &logits[b * V];
        std::copy(p.head_bias, p.head_bias + V, sum);
        for (int u = 0; u < T; u++)
          for (int v = 0; v < V; v++) sum[v] += share[u * B * vp + v];
      }
    }
  }
  const float* last = s.h() + (total % 2) * L * B * H;
  for (int lb = 0; lb < L * B; lb++) {
    std::copy(&c[lb * units], &c[lb * units] + units, p.c_out + lb * H + first);
    std::copy(last + lb * H + first, last + lb * H + first + units, p.h_out + lb * H + first);
  }
  if (t == 0) std::copy(logits.begin(), logits.end(), p.logits_out);
}

}  // namespace jaxchar

#endif  // JAXCHAR_LSTM_LOOP_H_
