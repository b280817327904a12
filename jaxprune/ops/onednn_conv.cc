// oneDNN convolutions for XLA:CPU, as typed XLA FFI handlers (float32, 2-D, NHWC).
//
// XLA:CPU's convolution passes ran at about half the speed of oneDNN's on the benchmark CPU
// (experiments/results/bench/conv_profile.md). jaxprune/ops/onednn.py lowers the
// `conv_general_dilated` equations it recognises to these handlers:
//
//   JaxpruneOnednnConvForward          out = conv(a = src NHWC, b = weights)
//   JaxpruneOnednnConvBackwardData     out = diff_src NHWC from (a = diff_dst NHWC, b = weights)
//   JaxpruneOnednnConvBackwardWeights  out = diff_weights from (a = src NHWC, b = diff_dst NHWC)
//
// Every handler takes one int64 array attribute "problem" (see `Problem`) that describes the
// convolution in oneDNN's terms, including the element strides of the weights buffer, so
// HWIO, the transposed kernel of an input gradient and grouped kernels need no copy in XLA.
//
// Threads. oneDNN (Debian's build) parallelises with OpenMP, beside XLA's own thread pool. On
// a loaded machine an OpenMP team waits at every barrier for a member the scheduler has put
// aside (a 9k-element weight reorder took 5 ms with 2 threads, 4 us with 1). So the batch can
// instead be cut into slices that XLA's pool threads and the caller take in turn, one OpenMP
// thread each; the weight gradient sums the slices' partial results. Both knobs are set at
// run time (JaxpruneOnednnSetThreads), so they can be compared in one process; the thread
// count is part of the cache key because oneDNN partitions the work when it creates a
// primitive.
//
// Creating a oneDNN primitive costs far more than running a small convolution, so primitives
// (and the reorders to and from the layouts they chose) are cached per problem. The cached
// entries are immutable; reorder buffers and scratchpads (user mode) are allocated per call,
// so calls and slices may run at the same time.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// The layout of the "problem" attribute (kept in sync with jaxprune/ops/onednn.py).
constexpr int kProblemSize = 24;
struct Problem {
  int64_t n, ic, ih, iw;       // input (src): batch, channels, height, width
  int64_t oc, oh, ow;          // output (dst) channels, height, width
  int64_t kh, kw, groups;      // kernel window and feature groups
  int64_t sh, sw;              // strides
  int64_t dh, dw;              // dilation, oneDNN style (0: none)
  int64_t plh, plw, prh, prw;  // padding, low and high, all >= 0
  int64_t wg, wo, wi, wh, ww;  // element strides of the weights buffer (group, out, in, h, w)
  int64_t blocked;             // 1: oneDNN chooses the activations' layout (reorders around)
};

Problem Decode(ffi::Span<const int64_t> v) {
  Problem p;
  int64_t* fields[kProblemSize] = {&p.n,  &p.ic, &p.ih,  &p.iw,  &p.oc,  &p.oh,
                                   &p.ow, &p.kh, &p.kw,  &p.groups, &p.sh, &p.sw,
                                   &p.dh, &p.dw, &p.plh, &p.plw, &p.prh, &p.prw,
                                   &p.wg, &p.wo, &p.wi,  &p.wh,  &p.ww,  &p.blocked};
  for (int i = 0; i < kProblemSize; ++i) *fields[i] = v[i];
  return p;
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream per calling thread: XLA may run independent custom calls concurrently.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

Dims WeightDims(const Problem& p) {
  if (p.groups > 1) return {p.groups, p.oc / p.groups, p.ic / p.groups, p.kh, p.kw};
  return {p.oc, p.ic, p.kh, p.kw};
}

memory::desc UserWeights(const Problem& p) {
  Dims strides = p.groups > 1 ? Dims{p.wg, p.wo, p.wi, p.wh, p.ww} : Dims{p.wo, p.wi, p.wh, p.ww};
  return memory::desc(WeightDims(p), memory::data_type::f32, strides);
}

memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w, bool any) {
  return memory::desc({n, c, h, w}, memory::data_type::f32,
                      any ? memory::format_tag::any : memory::format_tag::nhwc);
}

// A cached primitive with its operands: slot 0 and 1 are the handler's arguments a and b,
// slot 2 its result. `used` is the layout the primitive wants; where it differs from the
// buffer's (`user`) the slot goes through a buffer with a cached reorder. An entry is
// immutable once made; the buffers and the scratchpad are allocated per call, so calls may
// run at the same time.
struct Entry {
  dnnl::primitive primitive;
  int arg[3];
  memory::desc user[3];
  memory::desc used[3];
  bool reordered[3] = {false, false, false};
  dnnl::reorder reorder[3];
  memory::desc scratchpad;
};

void SetSlot(Entry& e, int slot, int arg, const memory::desc& user, const memory::desc& used) {
  e.arg[slot] = arg;
  e.user[slot] = user;
  e.used[slot] = used;
  e.reordered[slot] = !(user == used);
  if (e.reordered[slot]) {
    e.reorder[slot] = slot < 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                     Engine(), user, Engine(), used))
                               : dnnl::reorder(dnnl::reorder::primitive_desc(
                                     Engine(), used, Engine(), user));
  }
}

std::unique_ptr<Entry> Create(Kind kind, const Problem& p) {
  const bool any = p.blocked != 0;
  const memory::desc src = Activations(p.n, p.ic, p.ih, p.iw, any);
  const memory::desc dst = Activations(p.n, p.oc, p.oh, p.ow, any);
  const memory::desc weights(WeightDims(p), memory::data_type::f32, memory::format_tag::any);
  const Dims strides = {p.sh, p.sw}, dilation = {p.dh, p.dw};
  const Dims pad_low = {p.plh, p.plw}, pad_high = {p.prh, p.prw};
  // The caller provides the scratchpad (user mode), so one primitive can run in several
  // threads at once, each with its own.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc forward(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                      dnnl::algorithm::convolution_direct, src, weights, dst,
                                      strides, dilation, pad_low, pad_high),
      attr, Engine());
  const memory::desc user_src = Activations(p.n, p.ic, p.ih, p.iw, false);
  const memory::desc user_dst = Activations(p.n, p.oc, p.oh, p.ow, false);
  auto e = std::make_unique<Entry>();
  if (kind == kForward) {
    SetSlot(*e, 0, DNNL_ARG_SRC, user_src, forward.src_desc());
    SetSlot(*e, 1, DNNL_ARG_WEIGHTS, UserWeights(p), forward.weights_desc());
    SetSlot(*e, 2, DNNL_ARG_DST, user_dst, forward.dst_desc());
    e->scratchpad = forward.scratchpad_desc();
    e->primitive = dnnl::convolution_forward(forward);
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, src, weights,
                                              dst, strides, dilation, pad_low, pad_high),
        attr, Engine(), forward);
    SetSlot(*e, 0, DNNL_ARG_DIFF_DST, user_dst, pd.diff_dst_desc());
    SetSlot(*e, 1, DNNL_ARG_WEIGHTS, UserWeights(p), pd.weights_desc());
    SetSlot(*e, 2, DNNL_ARG_DIFF_SRC, user_src, pd.diff_src_desc());
    e->scratchpad = pd.scratchpad_desc();
    e->primitive = dnnl::convolution_backward_data(pd);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, src,
                                                 weights, dst, strides, dilation, pad_low,
                                                 pad_high),
        attr, Engine(), forward);
    SetSlot(*e, 0, DNNL_ARG_SRC, user_src, pd.src_desc());
    SetSlot(*e, 1, DNNL_ARG_DIFF_DST, user_dst, pd.diff_dst_desc());
    SetSlot(*e, 2, DNNL_ARG_DIFF_WEIGHTS, UserWeights(p), pd.diff_weights_desc());
    e->scratchpad = pd.scratchpad_desc();
    e->primitive = dnnl::convolution_backward_weights(pd);
  }
  return e;
}

// OpenMP threads per primitive when the batch is not split (0: OpenMP's default), and how
// many batch slices to run on XLA's thread pool (0: one per pool thread; 1: no split; a
// slice runs on one OpenMP thread). See JaxpruneOnednnSetThreads.
std::atomic<int> g_threads{1};
std::atomic<int> g_chunks{0};

// Most primitives kept. Each holds JIT-compiled code (memory mappings of its own), and a long
// run meets many shapes (every pruning step has new widths), so the least recently used go.
std::atomic<int64_t> g_capacity{256};

// The cached primitive of a problem, made on first use. Callers hold a shared pointer, so an
// entry evicted while another thread runs it stays alive until that call ends.
std::shared_ptr<const Entry> Lookup(Kind kind, Problem p, int threads) {
  using Key = std::vector<int64_t>;
  static std::mutex mu;
  static std::list<Key> order;  // most recently used first
  static std::map<Key, std::pair<std::shared_ptr<const Entry>, std::list<Key>::iterator>> cache;
  const int64_t* fields = &p.n;
  Key key(fields, fields + kProblemSize);
  key.push_back(kind);
  key.push_back(threads);
  std::lock_guard<std::mutex> lock(mu);
  auto found = cache.find(key);
  if (found != cache.end()) {
    order.splice(order.begin(), order, found->second.second);
    return found->second.first;
  }
  std::shared_ptr<const Entry> entry = Create(kind, p);
  order.push_front(key);
  cache.emplace(key, std::make_pair(entry, order.begin()));
  while (static_cast<int64_t>(cache.size()) > std::max<int64_t>(g_capacity.load(), 1)) {
    cache.erase(order.back());
    order.pop_back();
  }
  return entry;
}

int64_t Elements(const memory::desc& desc) { return desc.get_size() / sizeof(float); }

memory Scratchpad(const Entry& e) {
  return e.scratchpad.get_size() > 0 ? memory(e.scratchpad, Engine()) : memory();
}

// Runs the primitive on one batch slice; a, b and out are in the primitive's layouts
// (`weights`, when given, replaces the weights slot: reordered once for all slices).
void Execute(const Entry& e, void* a, void* b, void* out) {
  dnnl::stream& stream = Stream();
  void* pointers[3] = {a, b, out};
  std::unordered_map<int, memory> args;
  for (int slot = 0; slot < 3; ++slot) {
    args[e.arg[slot]] = memory(e.used[slot], Engine(), pointers[slot]);
  }
  memory scratchpad = Scratchpad(e);
  if (scratchpad) args[DNNL_ARG_SCRATCHPAD] = scratchpad;
  e.primitive.execute(stream, args);
  stream.wait();
}

// Work shared by the calling thread and helpers on XLA's pool: each takes the next chunk
// until none is left, so the caller never waits for a task that has not started (the pool
// may be busy, or run tasks in the caller).
struct Job {
  explicit Job(int chunks, std::function<void(int)> work) : chunks(chunks), work(std::move(work)) {}
  const int chunks;
  const std::function<void(int)> work;
  std::atomic<int> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::string error;

  void Drain() {
    omp_set_num_threads(1);
    for (int chunk = next++; chunk < chunks; chunk = next++) {
      std::string message;
      try {
        work(chunk);
      } catch (const std::exception& err) {
        message = err.what();
      }
      std::lock_guard<std::mutex> lock(mu);
      if (!message.empty()) error = message;
      if (++done == chunks) cv.notify_all();
    }
  }
};

// Slices of the batch: n rows as `chunks` slices of `step` rows, the last one shorter.
struct Split {
  int64_t step, chunks, last;
};

Split SplitBatch(int64_t n, int64_t chunks) {
  const int64_t step = (n + chunks - 1) / chunks;
  const int64_t count = (n + step - 1) / step;
  return {step, count, n - (count - 1) * step};
}

// Runs the batch as slices on XLA's pool; false (nothing done) when the slices' primitives
// want other layouts than plain NHWC activations and one weights layout for all slices.
bool RunSplit(Kind kind, const Problem& p, void* pointers[3], int64_t chunks,
              ffi::ThreadPool& pool) {
  const Split split = SplitBatch(p.n, chunks);
  Problem head = p, tail = p;
  head.n = split.step;
  tail.n = split.last;
  omp_set_num_threads(1);
  const std::shared_ptr<const Entry> first_entry = Lookup(kind, head, 1);
  const std::shared_ptr<const Entry> last_entry = Lookup(kind, tail, 1);
  const Entry& first = *first_entry;
  const Entry& last = *last_entry;
  const int weight_slot = kind == kBackwardWeights ? 2 : 1;
  for (int slot = 0; slot < 3; ++slot) {
    if (slot != weight_slot && (first.reordered[slot] || last.reordered[slot])) return false;
  }
  if (!(first.used[weight_slot] == last.used[weight_slot])) return false;
  dnnl::stream& stream = Stream();
  // The weights (an argument of the forward and backward-data passes, the result of the
  // backward-weights pass) are shared by every slice: reorder them once.
  memory weights_user(first.user[weight_slot], Engine(), pointers[weight_slot]);
  memory weights = first.reordered[weight_slot] ? memory(first.used[weight_slot], Engine())
                                                : weights_user;
  if (kind != kBackwardWeights && first.reordered[1]) {
    first.reorder[1].execute(stream, weights_user, weights);
    stream.wait();
  }
  // Elements per batch row of the sliced operands.
  const int64_t src_row = p.ih * p.iw * p.ic, dst_row = p.oh * p.ow * p.oc;
  const int64_t weight_count = Elements(first.used[weight_slot]);
  // The backward-weights slices sum into separate buffers (slice 0 into the result).
  std::vector<std::vector<float>> partial(kind == kBackwardWeights ? split.chunks - 1 : 0);
  for (auto& buffer : partial) buffer.resize(weight_count);
  auto work = [&](int chunk) {
    const Entry& e = chunk == split.chunks - 1 ? last : first;
    const int64_t row = chunk * split.step;
    float* a = static_cast<float*>(pointers[0]);
    float* b = static_cast<float*>(pointers[1]);
    float* out = static_cast<float*>(pointers[2]);
    void* w = weights.get_data_handle();
    if (kind == kForward) {
      Execute(e, a + row * src_row, w, out + row * dst_row);
    } else if (kind == kBackwardData) {
      Execute(e, a + row * dst_row, w, out + row * src_row);
    } else {
      void* target = chunk == 0 ? w : partial[chunk - 1].data();
      Execute(e, a + row * src_row, b + row * dst_row, target);
    }
  };
  auto job = std::make_shared<Job>(static_cast<int>(split.chunks), work);
  const int64_t helpers = std::min<int64_t>(split.chunks - 1, std::max<int64_t>(pool.num_threads(), 1));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Drain(); });
  job->Drain();
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->done == job->chunks; });
    if (!job->error.empty()) throw std::runtime_error(job->error);
  }
  if (kind == kBackwardWeights) {
    float* total = static_cast<float*>(weights.get_data_handle());
    for (const auto& buffer : partial) {
      for (int64_t i = 0; i < weight_count; ++i) total[i] += buffer[i];
    }
    if (first.reordered[2]) {
      first.reorder[2].execute(stream, weights, weights_user);
      stream.wait();
    }
  }
  return true;
}

ffi::Error Run(Kind kind, ffi::Span<const int64_t> problem, const float* a, size_t a_count,
               const float* b, size_t b_count, float* out, size_t out_count,
               ffi::ThreadPool& pool) {
  if (problem.size() != kProblemSize) {
    return ffi::Error::InvalidArgument("oneDNN conv: the problem attribute has " +
                                       std::to_string(problem.size()) + " entries");
  }
  try {
    const Problem p = Decode(problem);
    int64_t chunks = g_chunks.load();
    if (chunks == 0) chunks = pool.num_threads();
    const bool split = chunks > 1 && p.n > 1 && !p.blocked;
    // Per calling thread: XLA may call from any thread of its pool.
    const int threads = g_threads.load();
    if (threads > 0) omp_set_num_threads(threads);
    const std::shared_ptr<const Entry> entry = Lookup(kind, p, threads);
    const Entry& e = *entry;
    const size_t counts[3] = {a_count, b_count, out_count};
    for (int slot = 0; slot < 3; ++slot) {
      if (static_cast<int64_t>(counts[slot]) != Elements(e.user[slot])) {
        return ffi::Error::InvalidArgument("oneDNN conv: buffer " + std::to_string(slot) +
                                           " does not match the problem");
      }
    }
    void* pointers[3] = {const_cast<float*>(a), const_cast<float*>(b), out};
    if (split && RunSplit(kind, p, pointers, std::min<int64_t>(chunks, p.n), pool)) {
      return ffi::Error::Success();
    }
    dnnl::stream& stream = Stream();
    memory user[3], used[3];
    for (int slot = 0; slot < 3; ++slot) {
      user[slot] = memory(e.user[slot], Engine(), pointers[slot]);
      used[slot] = e.reordered[slot] ? memory(e.used[slot], Engine()) : user[slot];
    }
    for (int slot = 0; slot < 2; ++slot) {
      if (e.reordered[slot]) e.reorder[slot].execute(stream, user[slot], used[slot]);
    }
    std::unordered_map<int, memory> args;
    for (int slot = 0; slot < 3; ++slot) args[e.arg[slot]] = used[slot];
    memory scratchpad = Scratchpad(e);
    if (scratchpad) args[DNNL_ARG_SCRATCHPAD] = scratchpad;
    e.primitive.execute(stream, args);
    if (e.reordered[2]) e.reorder[2].execute(stream, used[2], user[2]);
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::F32> weights,
                   ffi::ResultBuffer<ffi::F32> dst, ffi::Span<const int64_t> problem,
                   ffi::ThreadPool pool) {
  return Run(kForward, problem, src.typed_data(), src.element_count(), weights.typed_data(),
             weights.element_count(), dst->typed_data(), dst->element_count(), pool);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> diff_dst, ffi::Buffer<ffi::F32> weights,
                        ffi::ResultBuffer<ffi::F32> diff_src, ffi::Span<const int64_t> problem,
                        ffi::ThreadPool pool) {
  return Run(kBackwardData, problem, diff_dst.typed_data(), diff_dst.element_count(),
             weights.typed_data(), weights.element_count(), diff_src->typed_data(),
             diff_src->element_count(), pool);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::F32> diff_dst,
                           ffi::ResultBuffer<ffi::F32> diff_weights,
                           ffi::Span<const int64_t> problem, ffi::ThreadPool pool) {
  return Run(kBackwardWeights, problem, src.typed_data(), src.element_count(),
             diff_dst.typed_data(), diff_dst.element_count(), diff_weights->typed_data(),
             diff_weights->element_count(), pool);
}

}  // namespace

#define JAXPRUNE_ONEDNN_BINDING                 \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<ffi::Span<const int64_t>>("problem") \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvForward, Forward, JAXPRUNE_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvBackwardData, BackwardData,
                              JAXPRUNE_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvBackwardWeights, BackwardWeights,
                              JAXPRUNE_ONEDNN_BINDING);

// Sets, for the calls that follow, the number of OpenMP threads of an unsplit primitive (0:
// OpenMP's default, which OMP_NUM_THREADS sets) and the number of batch slices run side by
// side on XLA's thread pool, one OpenMP thread each (0: one per pool thread, 1: no split).
extern "C" void JaxpruneOnednnSetThreads(int threads, int chunks) {
  g_threads.store(threads < 0 ? 0 : threads);
  g_chunks.store(chunks < 0 ? 0 : chunks);
}

// Sets how many primitives the cache keeps (at least 1); the least recently used go first.
extern "C" void JaxpruneOnednnSetCacheCapacity(int64_t capacity) {
  g_capacity.store(capacity < 1 ? 1 : capacity);
}

// The oneDNN version the library runs with (major * 10000 + minor * 100 + patch), so Python
// can tell that the library loads and report what it measured.
extern "C" int64_t JaxpruneOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return static_cast<int64_t>(v->major) * 10000 + v->minor * 100 + v->patch;
}
