// distgn._distgn: the nanobind module under the distgn Python package. A thin
// layer over distgn::GroupNorm: tensors arrive as views of their owners'
// memory (a data pointer, the physical shape, dtype and layout), never
// copied; every call is one call of the C++ layer, with the GIL released.
// distgn::Error becomes ValueError with the same message.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <string>

#include "distgn/build_config.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"

namespace nb = nanobind;
using namespace distgn;

namespace {

// "cpu" or "cuda" (device memory: a CUDA build only, which the layer checks).
Device parse_device(const std::string& device) {
  if (device == "cpu") return Device::cpu;
  if (device == "cuda") return Device::cuda;
  throw Error("device must be \"cpu\" or \"cuda\", not \"" + device + "\"");
}

TensorView make_view(uintptr_t data, Shape shape, const std::string& dtype, const std::string& layout,
                     const std::string& device) {
  TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.shape = std::move(shape);
  v.dtype = parse_dtype(dtype);
  v.layout = parse_layout(layout);
  v.device = parse_device(device);
  return v;
}

// A payload written into a caller's buffer of `capacity` doubles (a torch
// tensor the caller then hands its collective).
void copy_payload(const std::vector<double>& payload, uintptr_t out, size_t capacity) {
  if (payload.size() != capacity)
    throw Error("payload has " + std::to_string(payload.size()) + " values but the buffer holds " +
                std::to_string(capacity));
  if (!payload.empty()) std::memcpy(reinterpret_cast<void*>(out), payload.data(), payload.size() * sizeof(double));
}

}  // namespace

NB_MODULE(_distgn, m) {
  m.doc() = "distgn's C++ GroupNorm (Flax semantics), for distgn.torch";
  // autograd graphs alive at interpreter exit hold layers and states; that
  // is torch's teardown order, not a leak of the binding's.
  nb::set_leak_warnings(false);
  // Whether this build has the CUDA backend (device tensors).
  m.attr("with_cuda") = bool(DISTGN_WITH_CUDA);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  nb::class_<TensorView>(m, "View")
      .def("__init__",
           [](TensorView* self, uintptr_t data, Shape shape, const std::string& dtype, const std::string& layout,
              const std::string& device) {
             new (self) TensorView(make_view(data, std::move(shape), dtype, layout, device));
           },
           nb::arg("data"), nb::arg("shape"), nb::arg("dtype"), nb::arg("layout") = "nhwc",
           nb::arg("device") = "cpu")
      .def_ro("shape", &TensorView::shape);

  nb::class_<MaskView>(m, "MaskView")
      .def("__init__",
           [](MaskView* self, uintptr_t data, Shape shape, const std::string& device) {
             new (self) MaskView{reinterpret_cast<const uint8_t*>(data), std::move(shape), parse_device(device)};
           },
           nb::arg("data"), nb::arg("shape"), nb::arg("device") = "cpu")
      .def_ro("shape", &MaskView::shape);

  nb::class_<Plan>(m, "Plan")
      .def_ro("num_cells", &Plan::num_cells)
      .def_ro("channels", &Plan::channels)
      .def_ro("num_groups", &Plan::num_groups)
      .def_ro("shape", &Plan::shape)
      .def_prop_ro("output_dtype", [](const Plan& p) { return dtype_name(p.output_dtype); })
      .def_prop_ro("stats_dtype", [](const Plan& p) { return dtype_name(p.stats_dtype); });

  nb::class_<ForwardState>(m, "ForwardState")
      .def(nb::init<>())
      .def_prop_ro("plan", &ForwardState::plan)
      .def_prop_ro("mean", &ForwardState::mean)
      .def_prop_ro("rstd", &ForwardState::rstd)
      .def_prop_ro("count", &ForwardState::count);

  using Opt = std::optional<int64_t>;
  nb::class_<GroupNorm>(m, "Layer")
      .def("__init__",
           [](GroupNorm* self, Opt num_groups, Opt group_size, double epsilon, std::optional<std::string> dtype,
              const std::string& param_dtype, bool use_scale, bool use_bias, bool use_fast_variance,
              bool force_float32_reductions) {
             GroupNormConfig c;
             c.num_groups = num_groups;
             c.group_size = group_size;
             c.epsilon = epsilon;
             if (dtype) c.dtype = parse_dtype(*dtype);
             c.param_dtype = parse_dtype(param_dtype);
             c.use_scale = use_scale;
             c.use_bias = use_bias;
             c.use_fast_variance = use_fast_variance;
             c.force_float32_reductions = force_float32_reductions;
             new (self) GroupNorm(std::move(c));
           },
           nb::arg("num_groups").none(), nb::arg("group_size").none(), nb::arg("epsilon"), nb::arg("dtype").none(),
           nb::arg("param_dtype"), nb::arg("use_scale"), nb::arg("use_bias"), nb::arg("use_fast_variance"),
           nb::arg("force_float32_reductions"))
      .def("plan",
           [](const GroupNorm& g, const Shape& shape, const std::string& layout, const std::string& dtype) {
             return g.plan(shape, parse_layout(layout), parse_dtype(dtype));
           })
      .def("set_scale", &GroupNorm::set_scale)
      .def("set_bias", &GroupNorm::set_bias)
      // The CUDA stream (a cudaStream_t as an integer, torch's
      // torch.cuda.current_stream().cuda_stream) of the calls on device tensors.
      .def("set_stream",
           [](GroupNorm& g, uintptr_t stream) { g.set_stream(reinterpret_cast<CUstream_st*>(stream)); },
           nb::arg("stream"))
      .def("forward", &GroupNorm::forward, nb::arg("x"), nb::arg("y"), nb::arg("mask").none(),
           nb::arg("state").none(), nb::call_guard<nb::gil_scoped_release>())
      .def("backward",
           [](GroupNorm& g, const TensorView& x, const TensorView& dy, const MaskView* mask, const ForwardState& state,
              const TensorView& dx, const TensorView* dscale, const TensorView* dbias) {
             g.backward(x, dy, mask, state, dx, dscale, dbias, ParamGradReduction::local);
           },
           nb::arg("x"), nb::arg("dy"), nb::arg("mask").none(), nb::arg("state"), nb::arg("dx"),
           nb::arg("dscale").none(), nb::arg("dbias").none(), nb::call_guard<nb::gil_scoped_release>())
      .def("forward_partial_stats",
           [](GroupNorm& g, const TensorView& x, const MaskView* mask, uintptr_t out, size_t capacity) {
             copy_payload(g.forward_partial_stats(x, mask), out, capacity);
           },
           nb::arg("x"), nb::arg("mask").none(), nb::arg("out"), nb::arg("capacity"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("forward_finish",
           [](GroupNorm& g, const TensorView& x, const TensorView& y, const MaskView* mask, uintptr_t gathered,
              int ranks, ForwardState* state) {
             g.forward_finish(x, y, mask, reinterpret_cast<const double*>(gathered), ranks, state);
           },
           nb::arg("x"), nb::arg("y"), nb::arg("mask").none(), nb::arg("gathered"), nb::arg("ranks"),
           nb::arg("state").none(), nb::call_guard<nb::gil_scoped_release>())
      .def("backward_partial_sums",
           [](GroupNorm& g, const TensorView& x, const TensorView& dy, const MaskView* mask, const ForwardState& state,
              uintptr_t out, size_t capacity) {
             copy_payload(g.backward_partial_sums(x, dy, mask, state), out, capacity);
           },
           nb::arg("x"), nb::arg("dy"), nb::arg("mask").none(), nb::arg("state"), nb::arg("out"),
           nb::arg("capacity"), nb::call_guard<nb::gil_scoped_release>())
      .def("backward_finish",
           [](GroupNorm& g, const TensorView& x, const TensorView& dy, const MaskView* mask, const ForwardState& state,
              uintptr_t summed, const TensorView& dx, const TensorView* dscale, const TensorView* dbias) {
             g.backward_finish(x, dy, mask, state, reinterpret_cast<const double*>(summed), dx, dscale, dbias);
           },
           nb::arg("x"), nb::arg("dy"), nb::arg("mask").none(), nb::arg("state"), nb::arg("summed"), nb::arg("dx"),
           nb::arg("dscale").none(), nb::arg("dbias").none(), nb::call_guard<nb::gil_scoped_release>());
}
