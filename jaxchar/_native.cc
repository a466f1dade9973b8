// The stateful generation loop of an LSTM model as one XLA FFI call, for CPUs at small
// batches.
//
// At batch 1 a character's work is a few matrix-vector products (the recurrent kernel alone
// is 1 MB at hidden 256) and XLA runs them on one core, streaming the kernels from the
// shared L3 cache at every step. Here the hidden units are split between threads, each
// thread packs its share of every kernel once per call (so it stays in that core's L2 for
// the whole loop), and the threads meet at a spinning barrier after each layer; the loop
// itself is in _lstm_loop.h (benchmarks/native_loop.cc runs it without XLA). The maths
// is the model's (jaxchar/model.py, jaxchar/fused.py) and the draw is sample_logits':
// argmax at temperature 0, else argmax(logits / temperature + Gumbel noise), the noise
// drawn by JAX from the same keys (jax.random.categorical's method). jaxchar/native.py
// prepares the inputs; tests/test_native.py compares the ids, state and logits with the
// lax.scan path.
//
// Inputs (float32): recurrent [L, H, 4H]; upper [max(L-1, 1), H, 4H] and upper_bias
// [max(L-1, 1), 4H], the input kernels and biases of layers 1..L-1; table [V, 4H], layer
// 0's input contribution (bias included) for each character; head [H, V]; head_bias [V];
// c0, h0 [L, B, H] for B rows; logits0 [B, V] (the last logits); prompt [B, P] (int32:
// characters read before the first draw, which then starts from their logits); noise
// [N, B, V]; temperature []. Outputs: ids [B, N] (int32), c, h [L, B, H], logits [B, V], as
// after P + N steps of the model. Attributes: gate (0 sigmoid, 1 hard sigmoid), threads (a
// power of two; H must divide by 16 x threads).
#include <Python.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "_lstm_loop.h"
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
// 2 ms the call cancels them and runs on one thread (returning false). A helper started
// after that only reads the shared gate, which outlives the call.
bool run_on_pool(const Problem& p, ffi::ThreadPool& pool) {
  struct Gate {
    std::atomic<int> started{0}, finished{0};
    std::atomic<int> state{0};  // 0 waiting, 1 go, 2 cancelled
  };
  auto gate = std::make_shared<Gate>();
  std::unique_ptr<Shared> shared;
  for (int t = 1; t < p.threads; t++)
    pool.Schedule([gate, &p, &shared, t] {
      gate->started.fetch_add(1, std::memory_order_acq_rel);
      int state;
      for (int tries = 1; (state = gate->state.load(std::memory_order_acquire)) == 0; tries++)
        if (tries % 4096 == 0) std::this_thread::yield();
      if (state == 2) return;
      work(p, *shared, t);
      gate->finished.fetch_add(1, std::memory_order_release);
    });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
  while (gate->started.load(std::memory_order_acquire) < p.threads - 1 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
  if (gate->started.load(std::memory_order_acquire) < p.threads - 1) {
    gate->state.store(2, std::memory_order_release);
    return false;
  }
  shared = std::make_unique<Shared>(p);
  gate->state.store(1, std::memory_order_release);
  work(p, *shared, 0);
  for (int tries = 1; gate->finished.load(std::memory_order_acquire) < p.threads - 1; tries++)
    if (tries % 4096 == 0) std::this_thread::yield();
  return true;
}

ffi::Error Generate(ffi::Buffer<ffi::F32> recurrent, ffi::Buffer<ffi::F32> upper,
                    ffi::Buffer<ffi::F32> upper_bias, ffi::Buffer<ffi::F32> table,
                    ffi::Buffer<ffi::F32> head, ffi::Buffer<ffi::F32> head_bias,
                    ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                    ffi::Buffer<ffi::F32> logits0, ffi::Buffer<ffi::S32> prompt,
                    ffi::Buffer<ffi::F32> noise,
                    ffi::Buffer<ffi::F32> temperature, ffi::ResultBuffer<ffi::S32> ids,
                    ffi::ResultBuffer<ffi::F32> c_out, ffi::ResultBuffer<ffi::F32> h_out,
                    ffi::ResultBuffer<ffi::F32> logits_out, int64_t kind, int64_t threads,
                    ffi::ThreadPool pool) {
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
  p.kind = kind;
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
  for (int64_t n = 0; n < prompt.element_count(); n++)
    if (p.prompt[n] < 0 || p.prompt[n] >= p.vocab)
      return ffi::Error::InvalidArgument(
          "jaxchar native generate: a prompt id is outside the vocabulary");
  if (p.threads > 1 && pool.num_threads() >= p.threads) {
    if (run_on_pool(p, pool)) return ffi::Error::Success();
  } else if (p.threads > 1) {  // XLA's pool is too small: threads of our own
    Shared shared(p);
    std::vector<std::thread> helpers;
    for (int t = 1; t < p.threads; t++)
      helpers.emplace_back(work, std::cref(p), std::ref(shared), t);
    work(p, shared, 0);
    for (auto& helper : helpers) helper.join();
    return ffi::Error::Success();
  }
  Problem alone = p;  // one thread, or the pool's threads were busy
  alone.threads = 1;
  Shared shared(alone);
  work(alone, shared, 0);
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
                                  .Attr<int64_t>("gate")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

// The extension is built with -march=native. On a CPU without the vector instructions that
// allowed (a build copied to another machine, such as an image built elsewhere) the kernel
// would die of an illegal instruction; there `targets()` is empty and the scan serves.
static bool cpu_runs_this_build() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) return false;
#endif
#ifdef __AVX2__
  if (!__builtin_cpu_supports("avx2")) return false;
#endif
#ifdef __FMA__
  if (!__builtin_cpu_supports("fma")) return false;
#endif
#endif
  return true;
}

// The Python module: `targets()` gives {name: capsule} for jax.ffi.register_ffi_target, or
// {} where this CPU cannot run the build.
static PyObject* targets(PyObject*, PyObject*) {
  if (!cpu_runs_this_build()) return PyDict_New();
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(JaxcharGenerate), nullptr, nullptr);
  if (capsule == nullptr) return nullptr;
  PyObject* out = Py_BuildValue("{s:N}", "jaxchar_generate", capsule);
  return out;
}

static PyMethodDef kMethods[] = {
    {"targets", targets, METH_NOARGS, "The XLA FFI handlers, by target name."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native", nullptr, -1, kMethods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&kModule); }
