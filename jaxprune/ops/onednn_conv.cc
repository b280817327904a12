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
// oneDNN (Debian's build) parallelises with OpenMP, beside XLA's own thread pool. The number
// of OpenMP threads it uses can be set at run time (JaxpruneOnednnSetThreads, 0: OpenMP's
// default), so that 1 and 2 threads can be compared in one process; it is part of the cache
// key because oneDNN partitions the work when it creates a primitive.
//
// Creating a oneDNN primitive costs far more than running a small convolution, so primitives
// (and the reorders to and from the layouts they chose) are cached per problem. A cache entry
// is executed under its own mutex: oneDNN's scratchpad and the entry's reorder buffers belong
// to the primitive, so one primitive must not run twice at the same time.

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
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
// buffer's (`user`) the slot goes through `buffer` with a cached reorder.
struct Entry {
  std::mutex mu;
  dnnl::primitive primitive;
  int arg[3];
  memory::desc user[3];
  memory::desc used[3];
  bool reordered[3] = {false, false, false};
  dnnl::reorder reorder[3];
  memory buffer[3];
  bool has_scratchpad = false;
  memory scratchpad;
};

void SetSlot(Entry& e, int slot, int arg, const memory::desc& user, const memory::desc& used) {
  e.arg[slot] = arg;
  e.user[slot] = user;
  e.used[slot] = used;
  e.reordered[slot] = !(user == used);
  if (e.reordered[slot]) {
    e.buffer[slot] = memory(used, Engine());
    e.reorder[slot] = slot < 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                     Engine(), user, Engine(), used))
                               : dnnl::reorder(dnnl::reorder::primitive_desc(
                                     Engine(), used, Engine(), user));
  }
}

template <typename PrimitiveDesc>
void SetScratchpad(Entry& e, const PrimitiveDesc& pd) {
  memory::desc desc = pd.scratchpad_desc();
  e.has_scratchpad = desc.get_size() > 0;
  if (e.has_scratchpad) e.scratchpad = memory(desc, Engine());
}

std::unique_ptr<Entry> Create(Kind kind, const Problem& p) {
  const bool any = p.blocked != 0;
  const memory::desc src = Activations(p.n, p.ic, p.ih, p.iw, any);
  const memory::desc dst = Activations(p.n, p.oc, p.oh, p.ow, any);
  const memory::desc weights(WeightDims(p), memory::data_type::f32, memory::format_tag::any);
  const Dims strides = {p.sh, p.sw}, dilation = {p.dh, p.dw};
  const Dims pad_low = {p.plh, p.plw}, pad_high = {p.prh, p.prw};
  // The scratchpad is owned by the entry (user mode): the library's own would be shared
  // between threads in ways that are not safe under concurrent execution.
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
    SetScratchpad(*e, forward);
    e->primitive = dnnl::convolution_forward(forward);
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, src, weights,
                                              dst, strides, dilation, pad_low, pad_high),
        attr, Engine(), forward);
    SetSlot(*e, 0, DNNL_ARG_DIFF_DST, user_dst, pd.diff_dst_desc());
    SetSlot(*e, 1, DNNL_ARG_WEIGHTS, UserWeights(p), pd.weights_desc());
    SetSlot(*e, 2, DNNL_ARG_DIFF_SRC, user_src, pd.diff_src_desc());
    SetScratchpad(*e, pd);
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
    SetScratchpad(*e, pd);
    e->primitive = dnnl::convolution_backward_weights(pd);
  }
  return e;
}

std::atomic<int> g_threads{0};

Entry& Lookup(Kind kind, ffi::Span<const int64_t> problem, int threads) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::unique_ptr<Entry>> cache;
  std::vector<int64_t> key(problem.begin(), problem.end());
  key.push_back(kind);
  key.push_back(threads);
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<Entry>& slot = cache[key];
  if (!slot) slot = Create(kind, Decode(problem));
  return *slot;
}

int64_t Elements(const memory::desc& desc) { return desc.get_size() / sizeof(float); }

ffi::Error Run(Kind kind, ffi::Span<const int64_t> problem, const float* a, size_t a_count,
               const float* b, size_t b_count, float* out, size_t out_count) {
  if (problem.size() != kProblemSize) {
    return ffi::Error::InvalidArgument("oneDNN conv: the problem attribute has " +
                                       std::to_string(problem.size()) + " entries");
  }
  try {
    // Per calling thread: XLA may call from any thread of its pool.
    const int threads = g_threads.load();
    if (threads > 0) omp_set_num_threads(threads);
    Entry& e = Lookup(kind, problem, threads);
    const size_t counts[3] = {a_count, b_count, out_count};
    for (int slot = 0; slot < 3; ++slot) {
      if (static_cast<int64_t>(counts[slot]) != Elements(e.user[slot])) {
        return ffi::Error::InvalidArgument("oneDNN conv: buffer " + std::to_string(slot) +
                                           " does not match the problem");
      }
    }
    void* pointers[3] = {const_cast<float*>(a), const_cast<float*>(b), out};
    std::lock_guard<std::mutex> lock(e.mu);
    dnnl::stream& stream = Stream();
    std::unordered_map<int, memory> args;
    memory user[3];
    for (int slot = 0; slot < 3; ++slot) {
      user[slot] = memory(e.user[slot], Engine(), pointers[slot]);
      args[e.arg[slot]] = e.reordered[slot] ? e.buffer[slot] : user[slot];
    }
    for (int slot = 0; slot < 2; ++slot) {
      if (e.reordered[slot]) e.reorder[slot].execute(stream, user[slot], e.buffer[slot]);
    }
    if (e.has_scratchpad) args[DNNL_ARG_SCRATCHPAD] = e.scratchpad;
    e.primitive.execute(stream, args);
    if (e.reordered[2]) e.reorder[2].execute(stream, e.buffer[2], user[2]);
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::F32> weights,
                   ffi::ResultBuffer<ffi::F32> dst, ffi::Span<const int64_t> problem) {
  return Run(kForward, problem, src.typed_data(), src.element_count(), weights.typed_data(),
             weights.element_count(), dst->typed_data(), dst->element_count());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> diff_dst, ffi::Buffer<ffi::F32> weights,
                        ffi::ResultBuffer<ffi::F32> diff_src, ffi::Span<const int64_t> problem) {
  return Run(kBackwardData, problem, diff_dst.typed_data(), diff_dst.element_count(),
             weights.typed_data(), weights.element_count(), diff_src->typed_data(),
             diff_src->element_count());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::F32> diff_dst,
                           ffi::ResultBuffer<ffi::F32> diff_weights,
                           ffi::Span<const int64_t> problem) {
  return Run(kBackwardWeights, problem, src.typed_data(), src.element_count(),
             diff_dst.typed_data(), diff_dst.element_count(), diff_weights->typed_data(),
             diff_weights->element_count());
}

}  // namespace

#define JAXPRUNE_ONEDNN_BINDING                 \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<ffi::Span<const int64_t>>("problem")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvForward, Forward, JAXPRUNE_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvBackwardData, BackwardData,
                              JAXPRUNE_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneOnednnConvBackwardWeights, BackwardWeights,
                              JAXPRUNE_ONEDNN_BINDING);

// Sets the number of OpenMP threads for the calls that follow (0: OpenMP's default, which
// OMP_NUM_THREADS sets).
extern "C" void JaxpruneOnednnSetThreads(int threads) { g_threads.store(threads < 0 ? 0 : threads); }

// The oneDNN version the library runs with (major * 10000 + minor * 100 + patch), so Python
// can tell that the library loads and report what it measured.
extern "C" int64_t JaxpruneOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return static_cast<int64_t>(v->major) * 10000 + v->minor * 100 + v->patch;
}
