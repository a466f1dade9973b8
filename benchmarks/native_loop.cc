// jaxchar's CPU generation kernel (jaxchar/csrc/lstm_loop.h) run stand-alone, without JAX or XLA
// around it: what benchmarks/bench_generate.py compares jaxchar's stateful mode with at
// batch 1, to show what the JAX call adds (dispatch, the prompt's inputs, XLA's threads).
//
// The tutorial's small model: LSTM-256, the scalar input, a 45-character head, float32,
// argmax. Random weights unless a file gives them (speed does not depend on them;
// tests/test_benchmarks.py gives jaxchar's and checks that the ids are jaxchar's).
//
//   g++ -O3 -march=native -std=c++20 -pthread -Ijaxchar native_loop.cc -o native_loop
//   ./native_loop THREADS LENGTH ROWS [WEIGHTS]
// WEIGHTS: raw little-endian float32, in this order: recurrent kernel [256, 1024], input
// kernel [1024], bias [1024], head kernel [256, 45], head bias [45] (jaxchar's names and
// layouts). Then, per line on stdin, one run of LENGTH characters for each of ROWS rows, each
// from a zero state after character 0: "run" answers "ok US_PER_STEP LAST_ID", "ids" answers
// "ids ID ... logits LOGIT ..." with row 0's characters and its logits after the last one
// (the rows start alike, so they stay alike: ROWS is there to time the batched loop).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lstm_loop.h"

namespace {

constexpr int kHidden = 256, kGates = 4 * kHidden, kVocab = 45;

struct Weights {
  std::vector<float> recurrent = std::vector<float>(kHidden * kGates);
  std::vector<float> table = std::vector<float>(kVocab * kGates);  // id / vocab x w_in + bias
  std::vector<float> head = std::vector<float>(kHidden * kVocab);
  std::vector<float> head_bias = std::vector<float>(kVocab);
};

// random weights, or read from `path`; false if the file is short or missing
bool load_weights(const char* path, Weights& w) {
  std::vector<float> w_in(kGates), bias(kGates);
  if (path) {
    std::ifstream file(path, std::ios::binary);
    for (auto* part : {&w.recurrent, &w_in, &bias, &w.head, &w.head_bias})
      file.read(reinterpret_cast<char*>(part->data()), part->size() * sizeof(float));
    if (!file) return false;
  } else {
    std::mt19937 gen(0);
    std::uniform_real_distribution<float> u(-0.06f, 0.06f);
    for (auto& x : w.recurrent) x = u(gen);
    for (auto& x : w_in) x = 3 * u(gen);
    for (auto& x : w.head) x = 5 * u(gen);
    for (auto& x : bias) x = 10 * u(gen);  // else the state stays at zero, a special case
  }
  for (int v = 0; v < kVocab; v++)
    for (int j = 0; j < kGates; j++)
      w.table[v * kGates + j] = v / float(kVocab) * w_in[j] + bias[j];
  return true;
}

// Pins the calling thread to the t-th CPU this process may use. A helper woken from its
// condition variable was at times placed on the core of the thread that woke it, and runs
// then took twice as long (a third of one benchmark's runs) until the scheduler moved it.
void pin(int t) {
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
  std::vector<int> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
    if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
  if (static_cast<int>(cpus.size()) < 2) return;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpus[t % cpus.size()], &one);
  pthread_setaffinity_np(pthread_self(), sizeof one, &one);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "usage: native_loop THREADS LENGTH ROWS [WEIGHTS]\n";
    return 2;
  }
  const int threads = std::atoi(argv[1]), length = std::atoi(argv[2]), rows = std::atoi(argv[3]);
  if (threads < 1 || kHidden % (16 * threads) != 0 || length < 1 || rows < 1) {
    std::cerr << "THREADS must divide " << kHidden / 16 << "; LENGTH and ROWS must be >= 1\n";
    return 2;
  }
  Weights w;
  if (!load_weights(argc == 5 ? argv[4] : nullptr, w)) {
    std::cerr << "cannot read the weights from " << argv[4] << "\n";
    return 2;
  }
  const std::vector<int32_t> first(rows, 0);  // the prompt: character 0
  const size_t cells = static_cast<size_t>(rows) * kHidden;
  std::vector<float> zeros(std::max(cells, size_t{kGates}), 0.0f);
  std::vector<float> noise(static_cast<size_t>(length) * rows * kVocab, 0.0f);
  std::vector<float> c(cells), h(cells), logits(static_cast<size_t>(rows) * kVocab);
  std::vector<int32_t> ids(static_cast<size_t>(rows) * length);
  jaxchar::Problem p{};
  p.layers = 1, p.hidden = kHidden, p.vocab = kVocab, p.batch = rows, p.threads = threads;
  p.gate_activation = 0;
  p.prompt_length = 1, p.prompt = first.data(), p.steps = length;
  p.recurrent = w.recurrent.data(), p.upper = zeros.data(), p.upper_bias = zeros.data();
  p.table = w.table.data(), p.head = w.head.data(), p.head_bias = w.head_bias.data();
  p.c0 = zeros.data(), p.h0 = zeros.data(), p.logits0 = zeros.data(), p.noise = noise.data();
  p.temperature = 0.0f, p.ids = ids.data();
  p.c_out = c.data(), p.h_out = h.data(), p.logits_out = logits.data();

  // helper threads that live from run to run, as XLA's pool threads do for the kernel: a
  // thread started per run often began on the core of the one that started it, and runs
  // then took 2-3x as long until the scheduler moved it. Between runs they sleep on a
  // condition variable, so that they take nothing from the peers timed in between.
  std::mutex mutex;
  std::condition_variable wake;
  int run = 0;  // the run number (under the mutex); -1 to stop
  std::atomic<int> done{0};
  std::unique_ptr<jaxchar::Shared> shared;
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; t++)
    helpers.emplace_back([&, t] {
      pin(t);
      for (int seen = 0;;) {
        {
          std::unique_lock<std::mutex> lock(mutex);
          wake.wait(lock, [&] { return run != seen; });
          if (run < 0) return;
          seen = run;
        }
        jaxchar::work(p, *shared, t);
        done.fetch_add(1, std::memory_order_release);
      }
    });
  pin(0);
  std::string line;
  while (std::getline(std::cin, line)) {  // one run per line: the caller times the round trip
    auto began = std::chrono::steady_clock::now();
    shared = std::make_unique<jaxchar::Shared>(p);
    done.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex);
      run++;
    }
    wake.notify_all();
    jaxchar::work(p, *shared, 0);
    while (done.load(std::memory_order_acquire) < threads - 1) std::this_thread::yield();
    std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - began;
    if (line == "ids") {
      std::printf("ids");
      for (int n = 0; n < length; n++) std::printf(" %d", ids[n]);
      std::printf(" logits");
      for (int v = 0; v < kVocab; v++) std::printf(" %.7g", logits[v]);
      std::printf("\n");
    } else {
      std::printf("ok %.3f %d\n", took.count() / length, ids.back());
    }
    std::fflush(stdout);
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    run = -1;
  }
  wake.notify_all();
  for (auto& helper : helpers) helper.join();
  return 0;
}
