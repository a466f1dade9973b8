// jaxchar's CPU kernels as XLA FFI calls: the stateful generation loop of an LSTM model at
// small batches (below), and the forward and backward recurrences of an LSTM layer's
// training step (LayerForward, LayerBackward; the loops are in lstm_train.h).
//
// At batch 1 a character's work is a few matrix-vector products (the recurrent kernel alone
// is 1 MB at hidden 256) and XLA runs them on one core, streaming the kernels from the
// shared L3 cache at every step. Here the hidden units are split between threads, each
// thread packs its share of every kernel once per call (so it stays in that core's L2 for
// the whole loop), and the threads meet at a spinning barrier after each layer; the loop
// itself is in lstm_loop.h (benchmarks/native_loop.cc runs it without XLA). The maths
// is the model's (jaxchar/lstm/cells.py, jaxchar/lstm/fused.py) and the draw is sample_logits':
// argmax at temperature 0, else argmax(logits / temperature + Gumbel noise), the noise
// drawn by JAX from the same keys (jax.random.categorical's method). jaxchar/lstm/native/generation.py
// prepares the inputs; tests/test_native.py compares the ids, state and logits with the
// lax.scan path.
//
// Inputs (float32): recurrent [L, H, 4H]; upper [max(L-1, 1), H, 4H] and upper_bias
// [max(L-1, 1), 4H], the input kernels and biases of layers 1..L-1; table [V, 4H], layer
// 0's input contribution (bias included) for each character; head [H, V]; head_bias [V];
// c0, h0 [L, B, H] for B rows; logits0 [B, V] (the last logits); prompt [B, P] (int32:
// characters read before the first draw, which then starts from their logits); noise
// [N, B, V]; temperature []. Outputs: ids [B, N] (int32), c, h [L, B, H], logits [B, V], as
// after P + N steps of the model. Attributes: gate_activation (0 sigmoid, 1 hard_sigmoid), threads (a
// power of two; H must divide by 16 x threads).
#include <Python.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "lstm_loop.h"
#include "lstm_train.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxchar::Problem;
using jaxchar::Shared;
using jaxchar::work;

// The helpers run on XLA's own CPU threads: a thread of our own would compete with them for
// the cores (they spin a while when idle), which made two threads slower than one. But XLA
// may be running other work on them, this very kernel included (several samples dispatched
// at once): so the helpers first report that they started, and if they all have not within
// 2 ms the call cancels them (returning false) and the caller starts threads of its own. A
// helper started after that only reads the shared start line, which outlives the call.
template <class Work>  // Work: void(int thread), thread 0 being the caller's
bool run_on_pool(int threads, ffi::ThreadPool& pool, const Work& work) {
  struct StartLine {
    std::atomic<int> started{0}, finished{0};
    std::atomic<int> state{0};  // 0 waiting, 1 go, 2 cancelled
  };
  auto line = std::make_shared<StartLine>();
  for (int t = 1; t < threads; t++)
    pool.Schedule([line, &work, t] {
      line->started.fetch_add(1, std::memory_order_acq_rel);
      int state;
      for (int tries = 1; (state = line->state.load(std::memory_order_acquire)) == 0; tries++)
        if (tries % 4096 == 0) std::this_thread::yield();
      if (state == 2) return;
      work(t);
      line->finished.fetch_add(1, std::memory_order_release);
    });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
  while (line->started.load(std::memory_order_acquire) < threads - 1 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
  if (line->started.load(std::memory_order_acquire) < threads - 1) {
    line->state.store(2, std::memory_order_release);
    return false;
  }
  line->state.store(1, std::memory_order_release);
  work(0);
  for (int tries = 1; line->finished.load(std::memory_order_acquire) < threads - 1; tries++)
    if (tries % 4096 == 0) std::this_thread::yield();
  return true;
}

// Runs work(p, shared, t) on p.threads threads: XLA's where they are free, else threads of
// our own. Never on fewer: how the units and the partial sums are split between threads
// decides the order of the float additions, so the thread count is part of the result, and
// the same call must give the same bits whether or not XLA's pool was busy at that moment.
// S is the problem's shared state.
// Returns how many barrier waits were late (Barrier::late_waits: the cores are shared).
template <class S, class P, class Work>
int run(const P& p, ffi::ThreadPool& pool, Work work) {
  S shared(p);
  if (p.threads > 1 && pool.num_threads() >= p.threads &&
      run_on_pool(p.threads, pool, [&](int t) { work(p, shared, t); }))
    return shared.barrier.late_waits();
  std::vector<std::thread> helpers;
  for (int t = 1; t < p.threads; t++) helpers.emplace_back([&, t] { work(p, shared, t); });
  work(p, shared, 0);
  for (auto& helper : helpers) helper.join();
  return shared.barrier.late_waits();
}

// Generation of few rows on a machine whose cores other processes hold. Its threads meet
// once a layer a character (every ~4 us at one row): when a partner thread is off its core,
// the others wait a scheduler slice, and two threads made 2-4x fewer characters a second
// than one (benchmarks/bench_backends.py --load). So a call in which more than 1 barrier
// wait in 100 was late (over Barrier::kLate) marks the machine busy for the next second, and
// few-row calls in that second run on one thread. (One row, two layers, 1200 waits: 0-1
// late back to back on a quiet machine, 14-68 after an idle second, 29-54 under load.)
// Steps of many rows (and the training recurrences) keep their thread count: their sums'
// order is part of the result. For few rows one thread changes only the order of the
// logits' float sums, as the lax.scan path's order differs from the kernel's: the ids agree
// but where two logits tie to rounding.
class Contention {
 public:
  bool busy() const { return now() < busy_until_.load(std::memory_order_relaxed); }
  void report(int late, int waits) {
    if (waits >= 100 && 100 * late > waits)  // more than 1 wait in 100 late
      busy_until_.store(now() + 1'000'000'000, std::memory_order_relaxed);
  }

 private:
  static int64_t now() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  std::atomic<int64_t> busy_until_{0};
};

Contention contention;

ffi::Error Generate(ffi::Buffer<ffi::F32> recurrent, ffi::Buffer<ffi::F32> upper,
                    ffi::Buffer<ffi::F32> upper_bias, ffi::Buffer<ffi::F32> table,
                    ffi::Buffer<ffi::F32> head, ffi::Buffer<ffi::F32> head_bias,
                    ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                    ffi::Buffer<ffi::F32> logits0, ffi::Buffer<ffi::S32> prompt,
                    ffi::Buffer<ffi::F32> noise,
                    ffi::Buffer<ffi::F32> temperature, ffi::ResultBuffer<ffi::S32> ids,
                    ffi::ResultBuffer<ffi::F32> c_out, ffi::ResultBuffer<ffi::F32> h_out,
                    ffi::ResultBuffer<ffi::F32> logits_out, int64_t gate_activation, int64_t threads,
                    int64_t bf16, ffi::ThreadPool pool) {
  auto rec = recurrent.dimensions();
  auto tab = table.dimensions();
  auto start = c0.dimensions();
  if (rec.size() != 3 || tab.size() != 2 || start.size() != 3 || prompt.dimensions().size() != 2 ||
      noise.dimensions().size() != 3)
    return ffi::Error::InvalidArgument("jaxchar native generate: unexpected ranks");
  Problem p;
  p.layers = static_cast<int>(rec[0]);
  p.hidden = static_cast<int>(rec[1]);
  p.vocab = static_cast<int>(tab[0]);
  p.batch = static_cast<int>(start[1]);
  p.steps = static_cast<int>(noise.dimensions()[0]);
  p.prompt_length = static_cast<int>(prompt.dimensions()[1]);
  p.prompt = prompt.typed_data();
  p.threads = static_cast<int>(threads);
  p.gate_activation = gate_activation;
  p.bf16 = bf16 != 0;
  if (p.bf16 && (!jaxchar::kHasBf16 || p.hidden % 32 != 0))
    return ffi::Error::InvalidArgument("jaxchar native generate: no bfloat16 here, or hidden % 32");
  if (rec[2] != 4 * rec[1] || tab[1] != rec[2] || threads < 1 || p.hidden % (16 * threads) != 0 ||
      start[0] != rec[0] || start[2] != rec[1] || prompt.dimensions()[0] != p.batch ||
      noise.dimensions()[1] != p.batch || noise.dimensions()[2] != p.vocab)
    return ffi::Error::InvalidArgument("jaxchar native generate: unexpected shapes");
  p.recurrent = recurrent.typed_data();
  p.upper = upper.typed_data();
  p.upper_bias = upper_bias.typed_data();
  p.table = table.typed_data();
  p.head = head.typed_data();
  p.head_bias = head_bias.typed_data();
  p.c0 = c0.typed_data();
  p.h0 = h0.typed_data();
  p.logits0 = logits0.typed_data();
  p.noise = noise.typed_data();
  p.temperature = temperature.typed_data()[0];
  p.ids = ids->typed_data();
  p.c_out = c_out->typed_data();
  p.h_out = h_out->typed_data();
  p.logits_out = logits_out->typed_data();
  for (size_t n = 0; n < prompt.element_count(); n++)
    if (p.prompt[n] < 0 || p.prompt[n] >= p.vocab)
      return ffi::Error::InvalidArgument(
          "jaxchar native generate: a prompt id is outside the vocabulary");
  const bool few = p.batch < jaxchar::kFewRows;  // many rows: 100 us steps share cores well
  if (few && contention.busy()) p.threads = 1;
  const int late = run<Shared>(p, pool, work);
  if (few && p.threads > 1) contention.report(late, (p.prompt_length + p.steps) * p.layers);
  return ffi::Error::Success();
}

// the training recurrences (lstm_train.h): w_h [H, 4H], c0, h0 [B, H] and the layout below
ffi::Error CheckLayer(const jaxchar::LayerProblem& p, ffi::Buffer<ffi::F32>& w_h,
                      ffi::Buffer<ffi::F32>& c0, int64_t h0_count, int64_t threads) {
  auto w = w_h.dimensions();
  if (w.size() != 2 || w[1] != 4 * w[0] || threads < 1 || p.hidden % (16 * threads) != 0 ||
      p.hidden % jaxchar::kTile != 0 || c0.dimensions().size() != 2 ||
      c0.dimensions()[0] != p.batch || c0.dimensions()[1] != p.hidden ||
      h0_count != static_cast<int64_t>(c0.element_count()))
    return ffi::Error::InvalidArgument("jaxchar lstm layer: unexpected shapes");
  return ffi::Error::Success();
}

// Forward: xs [T, B, 1] (scalar features; w_in, bias [4H]) or [T, B, 4H] (projected inputs;
// bias [4H], w_in unread). Outputs hs, cs [T, B, H], acts [T, B, 4H], hp_t [H + 1 + scalar,
// T, B] (see lstm_train.h) and hs_fm, hs transposed to [H, T, B] (or empty: not wanted).
ffi::Error LayerForward(ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> xs,
                        ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                        ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> acts,
                        ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> hp_t,
                        ffi::ResultBuffer<ffi::F32> hs_fm, int64_t gate_activation, int64_t threads,
                        ffi::ThreadPool pool) {
  auto x = xs.dimensions();
  if (x.size() != 3)
    return ffi::Error::InvalidArgument("jaxchar lstm layer: xs must be [T, B, 1] or [T, B, 4H]");
  jaxchar::LayerProblem p{};
  p.steps = static_cast<int>(x[0]);
  p.batch = static_cast<int>(x[1]);
  p.hidden = static_cast<int>(w_h.dimensions()[0]);
  p.threads = static_cast<int>(threads);
  p.gate_activation = gate_activation;
  p.scalar = x[2] == 1;
  auto error = CheckLayer(p, w_h, c0, h0.element_count(), threads);
  if (error.failure()) return error;
  const size_t gates = 4 * static_cast<size_t>(p.hidden);
  if ((!p.scalar && x[2] != 4 * p.hidden) || bias.element_count() != gates ||
      (p.scalar && w_in.element_count() != gates))
    return ffi::Error::InvalidArgument("jaxchar lstm layer: unexpected input shapes");
  p.w_h = w_h.typed_data();
  p.xs = xs.typed_data();
  p.w_in = w_in.typed_data();
  p.bias = bias.typed_data();
  p.c0 = c0.typed_data();
  p.h0 = h0.typed_data();
  p.hs = hs->typed_data();
  p.acts_out = acts->typed_data();
  p.cs_out = cs->typed_data();
  p.hp_t = hp_t->typed_data();
  const auto states = static_cast<size_t>(p.steps) * p.batch * p.hidden;
  if (hp_t->element_count() != states + (1 + p.scalar) * states / p.hidden)
    return ffi::Error::InvalidArgument("jaxchar lstm layer: hp_t must be [H + 1 + scalar, T, B]");
  if (hs_fm->element_count() != 0 && hs_fm->element_count() != states)
    return ffi::Error::InvalidArgument("jaxchar lstm layer: hs_fm must be [H, T, B] or empty");
  p.hs_fm = hs_fm->element_count() ? hs_fm->typed_data() : nullptr;
  if (p.steps > 0) run<jaxchar::LayerShared>(p, pool, jaxchar::forward_work);
  return ffi::Error::Success();
}

// Backward: acts [T, B, 4H], cs [T, B, H] from the forward call, c0 [B, H], the gradients
// reaching hs [T, B, H] and the final c, h [B, H]. Outputs dz [T, B, 4H] and dc0, dh0 [B, H].
ffi::Error LayerBackward(ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> acts,
                         ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0,
                         ffi::Buffer<ffi::F32> d_hs, ffi::Buffer<ffi::F32> d_c,
                         ffi::Buffer<ffi::F32> d_h, ffi::ResultBuffer<ffi::F32> dz,
                         ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dh0,
                         int64_t gate_activation, int64_t threads, ffi::ThreadPool pool) {
  auto c = cs.dimensions();
  if (c.size() != 3)
    return ffi::Error::InvalidArgument("jaxchar lstm layer: cs must be [T, B, H]");
  jaxchar::LayerProblem p{};
  p.steps = static_cast<int>(c[0]);
  p.batch = static_cast<int>(c[1]);
  p.hidden = static_cast<int>(c[2]);
  p.threads = static_cast<int>(threads);
  p.gate_activation = gate_activation;
  auto error = CheckLayer(p, w_h, c0, d_c.element_count(), threads);
  if (error.failure()) return error;
  if (acts.element_count() != 4 * cs.element_count() ||
      d_hs.element_count() != cs.element_count() || d_h.element_count() != d_c.element_count())
    return ffi::Error::InvalidArgument("jaxchar lstm layer: unexpected gradient shapes");
  p.w_h = w_h.typed_data();
  p.acts = acts.typed_data();
  p.cs = cs.typed_data();
  p.c0 = c0.typed_data();
  p.d_hs = d_hs.typed_data();
  p.d_c = d_c.typed_data();
  p.d_h = d_h.typed_data();
  p.dz = dz->typed_data();
  p.dc0 = dc0->typed_data();
  p.dh0 = dh0->typed_data();
  if (p.steps > 0) {
    run<jaxchar::LayerShared>(p, pool, jaxchar::backward_work);
  } else {
    std::copy(p.d_c, p.d_c + d_c.element_count(), p.dc0);
    std::copy(p.d_h, p.d_h + d_h.element_count(), p.dh0);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcharGenerate, Generate,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // recurrent
                                  .Arg<ffi::Buffer<ffi::F32>>()  // upper
                                  .Arg<ffi::Buffer<ffi::F32>>()  // upper_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // head
                                  .Arg<ffi::Buffer<ffi::F32>>()  // head_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prompt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // noise
                                  .Arg<ffi::Buffer<ffi::F32>>()  // temperature
                                  .Ret<ffi::Buffer<ffi::S32>>()  // ids
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logits
                                  .Attr<int64_t>("gate_activation")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("bf16")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcharLayerForward, LayerForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acts
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hp_t
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs_fm
                                  .Attr<int64_t>("gate_activation")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcharLayerBackward, LayerBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_c
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Attr<int64_t>("gate_activation")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

// setup.py builds this file once per instruction-set variant (-march=x86-64-v3 for AVX2,
// x86-64-v4 for AVX-512, and x86-64-v4 plus AVX512-BF16), each as a module of its own
// (JAXCHAR_VARIANT names it). jaxchar/lstm/native/loader.py imports only a variant that this CPU's
// flags allow; this check repeats that here, from the compiler's own view of what it used,
// so that a variant loaded on a CPU without its instructions offers no targets rather than
// dying of an illegal instruction.
static bool cpu_runs_this_build() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#ifdef __AVX2__
  if (!__builtin_cpu_supports("avx2")) return false;
#endif
#ifdef __FMA__
  if (!__builtin_cpu_supports("fma")) return false;
#endif
#ifdef __BMI2__
  if (!__builtin_cpu_supports("bmi2")) return false;
#endif
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) return false;
#endif
#ifdef __AVX512BW__
  if (!__builtin_cpu_supports("avx512bw")) return false;
#endif
#ifdef __AVX512DQ__
  if (!__builtin_cpu_supports("avx512dq")) return false;
#endif
#ifdef __AVX512VL__
  if (!__builtin_cpu_supports("avx512vl")) return false;
#endif
#ifdef __AVX512CD__
  if (!__builtin_cpu_supports("avx512cd")) return false;
#endif
#ifdef __AVX512BF16__
  if (!__builtin_cpu_supports("avx512bf16")) return false;
#endif
#endif
  return true;
}

// The Python module: `targets()` gives {name: capsule} for jax.ffi.register_ffi_target, or
// {} where this CPU cannot run the build.
static PyObject* targets(PyObject*, PyObject*) {
  if (!cpu_runs_this_build()) return PyDict_New();
  auto capsule = [](XLA_FFI_Handler* handler) {
    return PyCapsule_New(reinterpret_cast<void*>(handler), nullptr, nullptr);
  };
  return Py_BuildValue("{s:N,s:N,s:N}", "jaxchar_generate", capsule(JaxcharGenerate),
                       "jaxchar_lstm_forward", capsule(JaxcharLayerForward),
                       "jaxchar_lstm_backward", capsule(JaxcharLayerBackward));
}

// Whether jaxchar_generate runs bfloat16 products (a build for a CPU with AVX512-BF16)
static PyObject* bf16(PyObject*, PyObject*) { return PyBool_FromLong(jaxchar::kHasBf16); }

static PyMethodDef kMethods[] = {
    {"targets", targets, METH_NOARGS, "The XLA FFI handlers, by target name."},
    {"bf16", bf16, METH_NOARGS, "Whether generation runs bfloat16 products."},
    {nullptr, nullptr, 0, nullptr}};

#ifndef JAXCHAR_VARIANT
#define JAXCHAR_VARIANT native
#endif
#define JAXCHAR_CAT(a, b) a##b
#define JAXCHAR_INIT(variant) JAXCHAR_CAT(PyInit__native_, variant)
#define JAXCHAR_STR2(x) #x
#define JAXCHAR_STR(x) JAXCHAR_STR2(x)

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_" JAXCHAR_STR(JAXCHAR_VARIANT),
                              nullptr, -1, kMethods};

PyMODINIT_FUNC JAXCHAR_INIT(JAXCHAR_VARIANT)(void) { return PyModule_Create(&kModule); }
