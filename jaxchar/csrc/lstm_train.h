// The two recurrences of an LSTM layer's training step, without XLA: the forward loop (which
// keeps what the backward pass needs) and the backward loop (which writes the gradient of
// the pre-activations, dz). Both split the hidden units between threads as the generation
// loop does (lstm_loop.h): a thread packs its units' columns of the recurrent kernel once a
// call, so they stay in its core's L2 for all the timesteps, and the threads meet once a
// timestep. The weight gradients are one product over all timesteps each, left to XLA
// (jaxchar/lstm/fused.py), which runs those near the machine's matrix-multiply peak.
//
// The maths is jaxchar/lstm/fused.py's, the reference that tests/test_native_layer.py
// compares this with (values and gradients).
#ifndef JAXCHAR_LSTM_TRAIN_H_
#define JAXCHAR_LSTM_TRAIN_H_

#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "lstm_loop.h"

namespace jaxchar {

// Layouts (float32, row-major): w_h [H, 4H]; xs [T, B, 1] scalar features (then w_in, bias
// [4H]) or [T, B, 4H] projected inputs (then bias [4H]); c0, h0 [B, H]; hs, cs
// [T, B, H]; acts [T, B, 4H], the gates' outputs (i, f, g, o); hp_t [H + extra, T, B], each
// step's h_{t-1} (h0 first) transposed, which is how XLA's product for the recurrent kernel's
// gradient wants it (XLA transposed a copy itself otherwise), then the scalar features xs
// (scalar inputs only) and a row of ones: with them that one product over dz also gives the
// input kernel's and the bias's gradients, instead of two more passes over dz in XLA; d_hs
// [T, B, H]; dz [T, B, 4H].
struct LayerProblem {
  int steps, batch, hidden, threads;
  int64_t gate_activation;  // 0 sigmoid, 1 hard_sigmoid
  bool scalar;
  const float *w_h, *xs, *w_in, *bias, *c0, *h0;
  float *hs, *acts_out, *cs_out, *hp_t;          // forward outputs (hp_t: [H + 1 + scalar,
                                                 // T, B])
  float* hs_fm;                                   // hs transposed, [H, T, B], or null
  const float *acts, *cs, *d_hs, *d_c, *d_h;     // backward inputs (d_c, d_h: [B, H])
  float *dz, *dc0, *dh0;                         // backward outputs
};

struct LayerShared {
  explicit LayerShared(const LayerProblem& p)
      : barrier(p.threads, Barrier::kLongSteps),
        partial(2 * static_cast<size_t>(p.threads) * p.batch * p.hidden) {}
  Barrier barrier;
  std::vector<float> partial;  // [2, threads, B, H]: each thread's share of dh, two steps
};

// the gates of `units` cells from z [4 x units], written to a [4 x units] row a, and the new
// c and h
template <bool kHardSigmoid>
void forward_cells(const float* __restrict z, float* __restrict c, float* __restrict h,
                   float* __restrict a, int units) {
  for (int u = 0; u < units; u++) {
    const float i = gate<kHardSigmoid>(z[u]), f = gate<kHardSigmoid>(z[units + u]);
    const float g = tanh_approx(z[2 * units + u]), o = gate<kHardSigmoid>(z[3 * units + u]);
    a[u] = i, a[units + u] = f, a[2 * units + u] = g, a[3 * units + u] = o;
    c[u] = f * c[u] + i * g;
    h[u] = o * tanh_approx(c[u]);
  }
}

#ifdef __AVX512F__
// the same on 16 lanes (lstm_loop.h's sigmoid_16 and tanh_16; units % 16 == 0, as the
// 64-column tiles make it): the same values, 30% less time than g++'s vectorized loop
template <>
inline void forward_cells<false>(const float* __restrict z, float* __restrict c,
                                 float* __restrict h, float* __restrict a, int units) {
  for (int u = 0; u < units; u += 16) {
    __m512 gates[4];
    for (int k = 0; k < 4; k++) {
      const __m512 zk = _mm512_loadu_ps(z + k * units + u);
      gates[k] = k == 2 ? tanh_16(zk) : sigmoid_16(zk);
      _mm512_storeu_ps(a + k * units + u, gates[k]);
    }
    const __m512 cu =
        _mm512_fmadd_ps(gates[1], _mm512_loadu_ps(c + u), _mm512_mul_ps(gates[0], gates[2]));
    _mm512_storeu_ps(c + u, cu);
    _mm512_storeu_ps(h + u, _mm512_mul_ps(gates[3], tanh_16(cu)));
  }
}
#endif

template <bool kHardSigmoid>
inline float through_gate(float d, float a) {  // d times the gate's slope at its output a
  if constexpr (kHardSigmoid) return a > 0.0f && a < 1.0f ? 0.2f * d : 0.0f;
  return d * a * (1.0f - a);
}

// dz of `units` cells, written to a [4 x units] row, from their gates (a [4 x H]-strided row
// of acts), the gradient reaching h (dh) and the running dc (writing a second copy of dz
// here stopped g++ vectorizing the loop)
template <bool kHardSigmoid>
void backward_cells(const float* __restrict a, const float* __restrict c,
                    const float* __restrict c_prev, const float* __restrict dh,
                    float* __restrict dc, float* __restrict dz, int H, int units) {
  for (int u = 0; u < units; u++) {
    const float i = a[u], f = a[H + u], g = a[2 * H + u], o = a[3 * H + u];
    const float tc = tanh_approx(c[u]);
    const float d = dc[u] + dh[u] * o * (1.0f - tc * tc);
    const float zi = through_gate<kHardSigmoid>(d * g, i), zf = through_gate<kHardSigmoid>(d * c_prev[u], f);
    const float zg = d * i * (1.0f - g * g), zo = through_gate<kHardSigmoid>(dh[u] * tc, o);
    dz[u] = zi, dz[units + u] = zf, dz[2 * units + u] = zg, dz[3 * units + u] = zo;
    dc[u] = d * f;
  }
}

// put(r, k, w_h[r, column k of this thread's]) for every row r and each of the thread's 4 x
// units columns k (gate k / units, unit first + k % units)
template <class Put>
void own_columns(const LayerProblem& p, int first, int units, Put put) {
  const int H = p.hidden;
  for (int r = 0; r < H; r++)
    for (int k = 0; k < 4 * units; k++)
      put(r, k, p.w_h[static_cast<int64_t>(r) * 4 * H + (k / units) * H + first + k % units]);
}

// the thread's units of a [B, H] state, as [B, units]
inline std::vector<float> own_units(const LayerProblem& p, const float* state, int first,
                                    int units) {
  std::vector<float> out(static_cast<size_t>(p.batch) * units);
  for (int b = 0; b < p.batch; b++)
    std::copy(state + b * p.hidden + first, state + b * p.hidden + first + units, &out[b * units]);
  return out;
}

// n floats to dst past the caches (non-temporal stores: no read of dst's lines first, no
// eviction of the packed weights) where dst is aligned; for the [T, B, 4H] arrays, written
// once a call and read back after it (5% of a training step in an interleaved A/B)
inline void stream_out(const float* src, float* dst, int n) {
#ifdef __AVX512F__
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && n % 16 == 0) {
    for (int i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

inline void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();  // the streamed stores visible before the call returns
#endif
}

// the units [first, first + units) of a [B, H] state into step n of a [H, T, B] array
inline void transpose_units(const LayerProblem& p, const float* h, int first, int units,
                            float* out, int n) {
  const int H = p.hidden, B = p.batch;
  for (int u = first; u < first + units; u++) {
    float* to = out + (static_cast<int64_t>(u) * p.steps + n) * B;
    for (int b = 0; b < B; b++) to[b] = h[b * H + u];
  }
}

inline void forward_work(const LayerProblem& p, LayerShared& s, int t) {
  const int H = p.hidden, B = p.batch, units = H / p.threads, first = t * units;
  const int cols = 4 * units, tiles = cols / kTile;
  // this thread's columns of w_h (gate by gate, its units), tile by tile: [tiles][H][kTile]
  std::vector<float> w(static_cast<size_t>(H) * cols);
  own_columns(p, first, units, [&](int r, int k, float v) {
    w[(static_cast<size_t>(k / kTile) * H + r) * kTile + k % kTile] = v;
  });
  std::vector<float> c = own_units(p, p.c0, first, units), z(static_cast<size_t>(kBlock) * cols);
  std::vector<float> act(cols);  // a row's gates, then streamed out to acts
  auto cells = p.gate_activation == 1 ? forward_cells<true> : forward_cells<false>;
  if (t == p.threads - 1) {  // hp_t's rows after h's: the scalar features, then ones
    const int64_t count = static_cast<int64_t>(p.steps) * B;
    float* extra = p.hp_t + static_cast<int64_t>(H) * count;
    if (p.scalar) extra = std::copy(p.xs, p.xs + count, extra);
    std::fill(extra, extra + count, 1.0f);
  }
  int sense = 0;
  for (int n = 0; n < p.steps; n++) {
    const int64_t at = static_cast<int64_t>(n) * B;  // row (n, 0) of the [T, B, ...] arrays
    const float* h_prev = n == 0 ? p.h0 : p.hs + (at - B) * H;  // all units: [B, H]
    transpose_units(p, h_prev, first, units, p.hp_t, n);  // h_{n-1}: for d w_h
    if (p.hs_fm && n > 0) transpose_units(p, h_prev, first, units, p.hs_fm, n - 1);
    for (int b0 = 0; b0 < B; b0 += kBlock) {
      const int block = std::min(B - b0, kBlock);
      for (int b = 0; b < block; b++) {  // the input's contribution, then the product
        float* zb = &z[b * cols];
        for (int g = 0; g < 4; g++) {
          const int col = g * H + first;
          if (p.scalar) {
            const float x = p.xs[at + b0 + b];
            for (int u = 0; u < units; u++)
              zb[g * units + u] = x * p.w_in[col + u] + p.bias[col + u];
          } else {  // the projected input plus the bias (one pass less over it in XLA)
            const float* row = p.xs + (at + b0 + b) * 4 * H + col;
            for (int u = 0; u < units; u++) zb[g * units + u] = row[u] + p.bias[col + u];
          }
        }
      }
      block_product(w.data(), H, static_cast<size_t>(H) * kTile, tiles, h_prev + b0 * H, H,
                    z.data(), cols, block);
      for (int b = 0; b < block; b++) {
        const int64_t row = at + b0 + b;
        cells(&z[b * cols], &c[(b0 + b) * units], p.hs + row * H + first, act.data(), units);
        for (int g = 0; g < 4; g++)
          stream_out(&act[g * units], p.acts_out + row * 4 * H + g * H + first, units);
        stream_out(&c[(b0 + b) * units], p.cs_out + row * H + first, units);
      }
    }
    s.barrier.wait(sense);  // this step's h complete: the next step reads all of it
  }
  const int last = p.steps - 1;  // for the next layer's d w_in
  if (p.hs_fm) transpose_units(p, p.hs + static_cast<int64_t>(last) * B * H, first, units,
                              p.hs_fm, last);
  stream_fence();
}

inline void backward_work(const LayerProblem& p, LayerShared& s, int t) {
  const int H = p.hidden, B = p.batch, T = p.threads, units = H / T, first = t * units;
  const int cols = 4 * units, tiles = H / kTile;
  // w_h's transpose restricted to this thread's columns: [tiles of H][cols][kTile]
  std::vector<float> w(static_cast<size_t>(H) * cols);
  own_columns(p, first, units, [&](int j, int k, float v) {
    w[(static_cast<size_t>(j / kTile) * cols + k) * kTile + j % kTile] = v;
  });
  std::vector<float> dc = own_units(p, p.d_c, first, units);
  std::vector<float> dh = own_units(p, p.d_h, first, units);
  auto cells = p.gate_activation == 1 ? backward_cells<true> : backward_cells<false>;
  // the block's dz rows: the product reads them here, then they are streamed out
  std::vector<float> dzs(static_cast<size_t>(kBlock) * cols);
  int sense = 0;
  for (int n = p.steps - 1; n >= 0; n--) {
    const int64_t at = static_cast<int64_t>(n) * B;
    const float* c_prev = n == 0 ? p.c0 : p.cs + (at - B) * H;
    float* mine = &s.partial[((n % 2) * T + t) * static_cast<size_t>(B) * H];
    for (int b0 = 0; b0 < B; b0 += kBlock) {
      const int block = std::min(B - b0, kBlock);
      for (int b = 0; b < block; b++) {
        const int64_t row = at + b0 + b;
        float* dhb = &dh[(b0 + b) * units];
        const float* d_out = p.d_hs + row * H + first;
        for (int u = 0; u < units; u++) dhb[u] += d_out[u];
        cells(p.acts + row * 4 * H + first, p.cs + row * H + first,
              c_prev + (b0 + b) * H + first, dhb, &dc[(b0 + b) * units], &dzs[b * cols], H,
              units);
      }
      float* out = mine + static_cast<size_t>(b0) * H;  // this thread's share of dh_prev
      std::fill(out, out + static_cast<size_t>(block) * H, 0.0f);
      for (int g = 0; g < 4; g++)  // from the block's dz rows, gate by gate (in L1)
        block_product(&w[static_cast<size_t>(g) * units * kTile], units,
                      static_cast<size_t>(cols) * kTile, tiles, &dzs[g * units], cols, out, H,
                      block);
      for (int b = 0; b < block; b++)
        for (int g = 0; g < 4; g++)
          stream_out(&dzs[b * cols + g * units], p.dz + (at + b0 + b) * 4 * H + g * H + first,
                     units);
    }
    s.barrier.wait(sense);  // every share of dh_prev complete
    const float* shares = &s.partial[(n % 2) * T * static_cast<size_t>(B) * H];
    for (int b = 0; b < B; b++) {
      float* dhb = &dh[b * units];
      std::copy(shares + b * H + first, shares + b * H + first + units, dhb);
      for (int other = 1; other < T; other++) {  // the same order in every thread
        const float* share = shares + (static_cast<size_t>(other) * B + b) * H + first;
        for (int u = 0; u < units; u++) dhb[u] += share[u];
      }
    }
  }
  stream_fence();
  for (int b = 0; b < B; b++) {
    std::copy(&dc[b * units], &dc[(b + 1) * units], p.dc0 + b * H + first);
    std::copy(&dh[b * units], &dh[(b + 1) * units], p.dh0 + b * H + first);
  }
}

}  // namespace jaxchar

#endif  // JAXCHAR_LSTM_TRAIN_H_
