// The fused K-step advection-diffusion solver of pde_keras, for TensorFlow on CPU.
//
// Computes exactly what pde_keras/solver.py's keras.ops solver computes (that
// solver is the reference; the stencil and the coefficient formulas below
// mirror `stencil_coefficients` and `_step_function` term by term), but one
// (image, channel block) at a time, with every intermediate held in per-unit
// planes (with a ghost border, see Grid) instead of whole tensors streamed
// through memory:
//
//   L H^{k+1} = M H^{k-1} - 2 (u_x + v_y) dt H^k + 2 dt f
//               + (-A_x + 2 B_x) H^k_{x+1} + (A_x + 2 B_x) H^k_{x-1}
//               + (-A_y + 2 B_y) H^k_{y+1} + (A_y + 2 B_y) H^k_{y-1}
//
// written per cell as H^{k+1} = a H^{k-1} + s f + b H^k + sum_n c_n S_n(H^k),
// with the seven coefficient maps (a, b, c_n, s) computed once per call from
// D_x, D_y, u, v.
//
// PdeKerasSolve(source f, initial H^0, D_x, D_y, u, v, scale, shift) -> H^K.
// With the attr rectify, map m of (D_x, D_y, u, v) is used as
// ReLU(map * scale[m] + shift[m]) (scale and shift are (4, channels): the
// Global layer's coefficient batch norms, applied as the maps are read).
// PdeKerasSolveGrad(same inputs, dL/dH^K) -> dL/d(f, H^0, D_x, D_y, u, v, scale,
// shift): recomputes the K states, runs the adjoint recurrence backwards
//   G^k = b G^{k+1} + sum_n S_n^T(c_n G^{k+1}) + a G^{k+2}
// (in gather form: the transposed shifts read the same offsets), keeping
// every G^k, then adds up six per-cell sums over the steps (see Sums) and
// chains them to D_x, D_y, u, v (u_x, v_y through the transposed central
// differences). With the attr
// shared_initial (f and H^0 one tensor) output 0 is dL/df + dL/dH^0 and
// output 1 is empty.
//
// PdeKerasDepthwiseMaps(x, kernel (3, 3, C, m)) -> m maps, their mean and
// (biased) variance per map and channel: the Global layer's depth-wise 3x3
// coefficient conv ("same"), one output per map, with the batch statistics
// its batch norms need; and its gradient op PdeKerasDepthwiseMapsGrad.
//
// All solver inputs are float32 NHWC tensors of one shape (the Python wrapper
// broadcasts scalar and per-channel coefficients). x is the height axis,
// y the width axis. Work is split over (image, block of channels) units on
// TensorFlow's intra-op thread pool.

#ifndef PDE_KERAS_UNIT_LANES  // The file itself: the op kernels twice (below), then the ops.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

// AVX-512 with 256-bit encodings (the build's -mavx512f -mavx512vl): mask
// registers for partial blocks, and the 16-channel kernels.
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define PDE_KERAS_AVX512 1
#endif

namespace pde_keras {

// The op kernels, compiled once per unit width: 8 channels per unit
// (namespace lanes8), and where the build has AVX-512 also 16 (lanes16, one
// 512-bit vector per cell, ~5 % faster training on AVX-512 CPUs). Each call
// takes the 16-channel kernels when its channels come in whole blocks of 16
// (a partial block would waste half a wide vector); the environment variable
// PDE_KERAS_LANES = 8 or 16 forces a width (16 only where built), for tests
// and comparisons. Both compute the same values.
#define PDE_KERAS_UNIT_LANES 8
namespace lanes8 {
#include __FILE__
}  // namespace lanes8
#undef PDE_KERAS_UNIT_LANES
#ifdef PDE_KERAS_AVX512
#define PDE_KERAS_UNIT_LANES 16
namespace lanes16 {
#include __FILE__
}  // namespace lanes16
#undef PDE_KERAS_UNIT_LANES
#endif

namespace {

bool UseWide(const ::tensorflow::Tensor& input) {
  const char* lanes = std::getenv("PDE_KERAS_LANES");
  const std::string forced = lanes == nullptr ? "" : lanes;
  if (forced == "8" || forced == "16") return forced == "16";
  const int64_t channels = input.dims() == 4 ? input.dim_size(3) : 0;
  return channels >= 16 && channels % 16 == 0;
}

// An op kernel that runs `Narrow` (8 channels per unit) or `Wide` (16) per
// call, by the channels of input 0 (the NHWC tensor of every op here).
template <class Narrow, class Wide>
class ByWidth : public ::tensorflow::OpKernel {
 public:
  explicit ByWidth(::tensorflow::OpKernelConstruction* context)
      : OpKernel(context), narrow_(context), wide_(context) {}

  void Compute(::tensorflow::OpKernelContext* context) override {
    if (UseWide(context->input(0))) {
      wide_.Compute(context);
    } else {
      narrow_.Compute(context);
    }
  }

 private:
  Narrow narrow_;
  Wide wide_;
};

}  // namespace

#ifdef PDE_KERAS_AVX512
#define BY_WIDTH(Op) ByWidth<lanes8::Op, lanes16::Op>
#else
#define BY_WIDTH(Op) lanes8::Op
#endif
// (Its work is per channel, not per unit.)
#define NARROW_ONLY(Op) lanes8::Op

REGISTER_OP("PdeKerasSolve")
    .Input("source: float")
    .Input("initial: float")
    .Input("diffusivity_x: float")
    .Input("diffusivity_y: float")
    .Input("velocity_x: float")
    .Input("velocity_y: float")
    .Input("scale: float")
    .Input("shift: float")
    .Input("kernel: kernels * float")
    .Output("solution: float")
    .Output("mean: float")
    .Output("variance: float")
    .Attr("steps: int >= 1")
    .Attr("dt: float")
    .Attr("dx: float")
    .Attr("dy: float")
    .Attr("boundary: {'periodic', 'neumann', 'dirichlet'}")
    .Attr("rectify: bool = false")
    .Attr("shared_initial: bool = false")
    .Attr("kernels: int >= 0 = 0")
    .Attr("depthwise: list(int) = []")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle input;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
      c->set_output(0, input);
      c->set_output(1, c->Vector(c->Dim(input, 3)));
      c->set_output(2, c->Vector(c->Dim(input, 3)));
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasSolveGrad")
    .Input("source: float")
    .Input("initial: float")
    .Input("diffusivity_x: float")
    .Input("diffusivity_y: float")
    .Input("velocity_x: float")
    .Input("velocity_y: float")
    .Input("scale: float")
    .Input("shift: float")
    .Input("mean: float")
    .Input("grad_solution: float")
    .Input("grad_mean: float")
    .Input("grad_variance: float")
    .Input("kernel: kernels * float")
    .Output("grad_source: float")
    .Output("grad_initial: float")
    .Output("grad_diffusivity_x: float")
    .Output("grad_diffusivity_y: float")
    .Output("grad_velocity_x: float")
    .Output("grad_velocity_y: float")
    .Output("grad_scale: float")
    .Output("grad_shift: float")
    .Output("grad_kernel: kernels * float")
    .Attr("steps: int >= 1")
    .Attr("dt: float")
    .Attr("dx: float")
    .Attr("dy: float")
    .Attr("boundary: {'periodic', 'neumann', 'dirichlet'}")
    .Attr("rectify: bool = false")
    .Attr("shared_initial: bool = false")
    .Attr("kernels: int >= 0 = 0")
    .Attr("depthwise: list(int) = []")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      bool shared_initial;
      int kernels;
      std::vector<int> depthwise;
      TF_RETURN_IF_ERROR(c->GetAttr("shared_initial", &shared_initial));
      TF_RETURN_IF_ERROR(c->GetAttr("kernels", &kernels));
      TF_RETURN_IF_ERROR(c->GetAttr("depthwise", &depthwise));
      for (int i = 0; i < 6; ++i) c->set_output(i, c->input(0));
      if (shared_initial) c->set_output(1, c->MakeShape({0}));
      for (size_t m = 0; m < depthwise.size() && m < 4; ++m) {
        if (depthwise[m] >= 0) c->set_output(2 + m, c->MakeShape({0}));
      }
      c->set_output(6, c->input(6));
      c->set_output(7, c->input(7));
      for (int k = 0; k < kernels; ++k) c->set_output(8 + k, c->input(12 + k));
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasDepthwiseMaps")
    .Input("input: float")
    .Input("kernel: float")
    .Output("maps: count * float")
    .Output("mean: float")
    .Output("variance: float")
    .Attr("count: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int count;
      TF_RETURN_IF_ERROR(c->GetAttr("count", &count));
      ::tensorflow::shape_inference::ShapeHandle input;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
      for (int i = 0; i < count; ++i) c->set_output(i, input);
      const auto statistics = c->Matrix(count, c->Dim(input, 3));
      c->set_output(count, statistics);
      c->set_output(count + 1, statistics);
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasDepthwiseMapsGrad")
    .Input("input: float")
    .Input("kernel: float")
    .Input("mean: float")
    .Input("grad_maps: count * float")
    .Input("grad_mean: float")
    .Input("grad_variance: float")
    .Input("addend: addends * float")
    .Output("grad_input: float")
    .Output("grad_kernel: float")
    .Attr("count: int >= 1")
    .Attr("addends: int >= 0 = 0")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasDepthwiseStatistics")
    .Input("input: float")
    .Input("kernel: float")
    .Input("mean: float")
    .Input("variance: float")
    .Output("input_out: float")
    .Output("mean_out: float")
    .Output("variance_out: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i : {0, 2, 3}) c->set_output(i == 0 ? 0 : i - 1, c->input(i));
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasNormalizeRelu")
    .Input("x: float")
    .Input("scale: float")
    .Input("shift: float")
    .Output("y: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_OP("PdeKerasNormalizeReluGrad")
    .Input("x: float")
    .Input("scale: float")
    .Input("shift: float")
    .Input("grad_y: float")
    .Output("grad_x: float")
    .Output("grad_scale: float")
    .Output("grad_shift: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < 3; ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("PdeKerasNormalizeRelu").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(NormalizeReluOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasNormalizeReluGrad").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(NormalizeReluGradOp));
REGISTER_OP("PdeKerasNormalization")
    .Input("gamma: count * float")
    .Input("beta: count * float")
    .Input("mean: count * float")
    .Input("variance: count * float")
    .Output("scale: float")
    .Output("shift: float")
    .Attr("count: int >= 1")
    .Attr("epsilon: list(float)")
    .Attr("rows: list(int)")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      std::vector<int> rows;
      TF_RETURN_IF_ERROR(c->GetAttr("rows", &rows));
      const auto shape =
          c->Matrix(static_cast<int64_t>(rows.size()), c->NumElements(c->input(0)));
      c->set_output(0, shape);
      c->set_output(1, shape);
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("PdeKerasNormalization").Device(::tensorflow::DEVICE_CPU),
                        NARROW_ONLY(NormalizationOp));
REGISTER_OP("PdeKerasGlobalInference")
    .Input("source: float")
    .Input("initial: float")
    .Input("kernel: float")
    .Input("scale: float")
    .Input("shift: float")
    .Output("output: float")
    .Attr("steps: int >= 1")
    .Attr("dt: float")
    .Attr("dx: float")
    .Attr("dy: float")
    .Attr("boundary: {'periodic', 'neumann', 'dirichlet'}")
    .Attr("maps: list(int)")
    .Attr("shared_initial: bool = false")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("PdeKerasGlobalInference").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(GlobalInferenceOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasDepthwiseMaps").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(DepthwiseOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasDepthwiseStatistics").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(DepthwiseStatisticsOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasDepthwiseMapsGrad").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(DepthwiseGradOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasSolve").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(SolveOp));
REGISTER_KERNEL_BUILDER(Name("PdeKerasSolveGrad").Device(::tensorflow::DEVICE_CPU),
                        BY_WIDTH(SolveGradOp));

}  // namespace pde_keras

#else  // One pass over the op kernels, PDE_KERAS_UNIT_LANES channels per unit.

namespace {

using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::OpOutputList;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// An InvalidArgument status with its parts concatenated (TensorFlow's own
// errors::InvalidArgument is deprecated for this).
template <typename... Parts>
absl::Status InvalidArgument(const Parts&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(parts...));
}

// Channels per work unit: one GCC vector of kLanes floats per cell, so every
// channel loop is a vector operation (AVX: one instruction, SSE: two); 8, or
// 16 in the AVX-512 pass (one 512-bit vector, a cache line per cell; see
// ByWidth). A last block of fewer channels is zero-padded.
constexpr int64_t kLanes = PDE_KERAS_UNIT_LANES;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
// A plane: one Lanes per cell of an (image, channel block), row-major.
using Plane = std::vector<Lanes>;
const Lanes kZero = {};
// Per-channel sums over many cells (batch statistics, the gradients of the
// maps' scale and shift) are kept in double: a float row sum is added to
// them once per row.
typedef double Doubles __attribute__((vector_size(kLanes * sizeof(double))));

inline Doubles Widen(const Lanes& value) { return __builtin_convertvector(value, Doubles); }

enum class Boundary { kPeriodic, kNeumann, kDirichlet };

struct Settings {
  int steps;
  Boundary boundary;
  bool rectify;  // D_x, D_y, u, v are given before their ReLU
  // H^0 is f (one tensor): the gradient writes dL/df + dL/dH^0 as output 0
  // and an empty output 1.
  bool shared_initial;
  // depthwise[m] = k >= 0: map m (D_x, D_y, u, v) is map k of the depth-wise
  // conv of H^0 (PdeKerasDepthwiseMaps with the op's kernel input), and the
  // gradient takes its share through that conv: into dL/dH^0 and the
  // kernel's gradient instead of an output of its own; -1: a given map.
  int depthwise[4];
  bool any_depthwise;
  // The scheme's constants, computed in double as the Python reference does
  // with Python floats, then rounded once.
  float half_over_dx, half_over_dy;        // central differences
  float dt_over_dx, dt_over_dy;            // A_x = u dt/dx, A_y = v dt/dy
  float two_dt_over_dx2, two_dt_over_dy2;  // 2 B_x / D_x, 2 B_y / D_y
  float minus_two_dt, two_dt;

  void Init(OpKernelConstruction* context) {
    float dt, dx, dy;
    std::string name;
    OP_REQUIRES_OK(context, context->GetAttr("steps", &steps));
    OP_REQUIRES_OK(context, context->GetAttr("dt", &dt));
    OP_REQUIRES_OK(context, context->GetAttr("dx", &dx));
    OP_REQUIRES_OK(context, context->GetAttr("dy", &dy));
    OP_REQUIRES_OK(context, context->GetAttr("boundary", &name));
    rectify = shared_initial = false;  // unless the op has these attrs
    if (context->HasAttr("rectify")) {
      OP_REQUIRES_OK(context, context->GetAttr("rectify", &rectify));
    }
    if (context->HasAttr("shared_initial")) {
      OP_REQUIRES_OK(context, context->GetAttr("shared_initial", &shared_initial));
    }
    std::vector<int> rows;
    if (context->HasAttr("depthwise")) {
      OP_REQUIRES_OK(context, context->GetAttr("depthwise", &rows));
    }
    OP_REQUIRES(context, rows.empty() || rows.size() == 4,
                InvalidArgument("depthwise must be empty or name 4 maps, got ", rows.size()));
    any_depthwise = false;
    for (int m = 0; m < 4; ++m) {
      depthwise[m] = rows.empty() ? -1 : rows[m];
      any_depthwise |= depthwise[m] >= 0;
      for (int n = 0; n < m; ++n) {
        OP_REQUIRES(context, depthwise[m] < 0 || depthwise[n] != depthwise[m],
                    InvalidArgument("depthwise names kernel map ", depthwise[m], " twice"));
      }
    }
    boundary = name == "periodic" ? Boundary::kPeriodic
               : name == "neumann" ? Boundary::kNeumann : Boundary::kDirichlet;
    const double t = dt, x = dx, y = dy;
    half_over_dx = 0.5 / x;
    half_over_dy = 0.5 / y;
    dt_over_dx = t / x;
    dt_over_dy = t / y;
    two_dt_over_dx2 = 2.0 * t / (x * x);
    two_dt_over_dy2 = 2.0 * t / (y * y);
    minus_two_dt = -2.0 * t;
    two_dt = 2.0 * t;
  }
};

// The same vector at any float-aligned address (one cell's channels of an
// NHWC tensor; GCC's vector types may alias their element type).
typedef float UnalignedLanes
    __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

// One cell's channels of an NHWC tensor (`block` of them, the rest zero) and
// back; `kFull`: block == kLanes, one vector load or store.
// A partial block is one masked load or store where the CPU has them (a
// memcpy of a variable size per cell cost ~2.5x the whole layer's time at
// 1 channel); masked-out lanes are neither read nor written.
#if !defined(PDE_KERAS_AVX512) && defined(__AVX2__)
inline __m256i BlockMask(int64_t block) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(block)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

template <bool kFull>
inline Lanes Load(const float* source, int64_t block) {
  if (kFull) return *reinterpret_cast<const UnalignedLanes*>(source);
#ifdef PDE_KERAS_AVX512
  const auto mask = static_cast<__mmask16>((1u << block) - 1);
  if constexpr (kLanes == 16) {
    return reinterpret_cast<Lanes>(_mm512_maskz_loadu_ps(mask, source));
  } else {
    return reinterpret_cast<Lanes>(_mm256_maskz_loadu_ps(static_cast<__mmask8>(mask), source));
  }
#elif defined(__AVX2__)
  return reinterpret_cast<Lanes>(_mm256_maskload_ps(source, BlockMask(block)));
#else
  Lanes value = kZero;
  std::memcpy(&value, source, block * sizeof(float));
  return value;
#endif
}

template <bool kFull>
inline void Store(const Lanes& value, float* target, int64_t block) {
  if (kFull) {
    *reinterpret_cast<UnalignedLanes*>(target) = value;
    return;
  }
#ifdef PDE_KERAS_AVX512
  const auto mask = static_cast<__mmask16>((1u << block) - 1);
  if constexpr (kLanes == 16) {
    _mm512_mask_storeu_ps(target, mask, reinterpret_cast<__m512>(value));
  } else {
    _mm256_mask_storeu_ps(target, static_cast<__mmask8>(mask), reinterpret_cast<__m256>(value));
  }
#elif defined(__AVX2__)
  _mm256_maskstore_ps(target, BlockMask(block), reinterpret_cast<__m256>(value));
#else
  std::memcpy(target, &value, block * sizeof(float));
#endif
}

// One (image, channel block) unit: `block` (<= kLanes) channels starting at
// `channel` of image `image`.
struct Unit {
  int64_t image, channel, block;
};

// Problem geometry and the unit <-> tensor mapping.
struct Geometry {
  int64_t batch, height, width, channels, cells, blocks;

  explicit Geometry(const TensorShape& shape)
      : batch(shape.dim_size(0)), height(shape.dim_size(1)), width(shape.dim_size(2)),
        channels(shape.dim_size(3)), cells(shape.dim_size(1) * shape.dim_size(2)),
        blocks((shape.dim_size(3) + kLanes - 1) / kLanes) {}

  int64_t units() const { return batch * blocks; }

  // The index of a unit (the inverse of unit()): where its per-unit sums go.
  int64_t index(const Unit& unit) const { return unit.image * blocks + unit.channel / kLanes; }

  Unit unit(int64_t index) const {
    const int64_t channel = (index % blocks) * kLanes;
    return {index / blocks, channel, std::min(kLanes, channels - channel)};
  }

  // The unit's channels of an NHWC tensor: the first cell's address.
  const float* Base(const float* tensor, const Unit& unit) const {
    return tensor + unit.image * cells * channels + unit.channel;
  }
  float* Base(float* tensor, const Unit& unit) const {
    return tensor + unit.image * cells * channels + unit.channel;
  }

  // Copies a plane (unpadded) into the unit's channels of an NHWC tensor,
  // or the plane plus `addend` (a tensor like it, which may be `tensor`).
  void Scatter(const Plane& plane, const Unit& unit, float* tensor,
               const float* addend = nullptr) const {
    if (unit.block == kLanes) {
      ScatterCells<true>(plane, unit, tensor, addend);
    } else {
      ScatterCells<false>(plane, unit, tensor, addend);
    }
  }

  template <bool kFull>
  void ScatterCells(const Plane& plane, const Unit& unit, float* tensor,
                    const float* addend) const {
    float* base = Base(tensor, unit);
    const float* added = addend ? Base(addend, unit) : nullptr;
    for (int64_t p = 0; p < cells; ++p) {
      Lanes value = plane[p];
      if (added) value += Load<kFull>(added + p * channels, unit.block);
      Store<kFull>(value, base + p * channels, unit.block);
    }
  }
};

// Sums each of `count` per-unit, per-channel sums (`partial[unit * count + k]`)
// over the batch, in a fixed order (deterministic, no locks): (count, channels).
std::vector<double> SumOverBatch(const Geometry& g, const std::vector<Doubles>& partial,
                                 int64_t count) {
  std::vector<double> total(count * g.channels, 0.0);
  for (int64_t index = 0; index < g.units(); ++index) {
    const Unit unit = g.unit(index);
    for (int64_t k = 0; k < count; ++k) {
      const Doubles& sum = partial[index * count + k];
      for (int64_t l = 0; l < unit.block; ++l) total[k * g.channels + unit.channel + l] += sum[l];
    }
  }
  return total;
}

// Per-channel values of a (rows, channels) tensor for the unit's channels,
// one Lanes per row (the lanes past the block zero).
void GatherChannels(const float* tensor, int64_t rows, int64_t channels, const Unit& unit,
                    Lanes* values) {
  for (int64_t r = 0; r < rows; ++r) {
    values[r] = kZero;
    std::memcpy(&values[r], tensor + r * channels + unit.channel, unit.block * sizeof(float));
  }
}

// A per-channel affine map, value * scale + shift: a coefficient map's
// normalisation before its ReLU (the layer's coefficient batch norm), or the
// share of a gradient that comes through batch statistics (StatisticsShare).
struct Affine {
  Lanes scale, shift;
};

// Batch statistics from per-unit moments (`partial[unit * 2 count + 2 k]` the
// sum, `+ 1` the sum of squares of value k): the mean and the biased variance
// per value and channel, (count, channels) each, as a batch normalisation in
// training mode uses them. With no values (an empty batch or image) both are
// 0 / 0, NaN, as a mean of nothing.
void WriteStatistics(const Geometry& g, const std::vector<Doubles>& partial, int64_t count,
                     float* mean, float* variance) {
  const std::vector<double> sums = SumOverBatch(g, partial, 2 * count);
  const double values = static_cast<double>(g.batch * g.cells);
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t c = 0; c < g.channels; ++c) {
      const double m = sums[2 * k * g.channels + c] / values;
      const double squares = sums[(2 * k + 1) * g.channels + c] / values;
      mean[k * g.channels + c] = static_cast<float>(m);
      variance[k * g.channels + c] = static_cast<float>(std::max(squares - m * m, 0.0));
    }
  }
}

// The share of a value's gradient that comes through its batch statistics:
// d mean / d value = 1 / N and d variance / d value = 2 (value - mean) / N
// (N values per channel), i.e. value * b + a per channel with
// b = 2 grad_variance / N, a = grad_mean / N - b mean; (count, channels) each.
// Returns false where every share is zero (the statistics were not used).
bool StatisticsShare(const Geometry& g, int64_t count, const float* mean, const float* grad_mean,
                     const float* grad_variance, std::vector<float>& a, std::vector<float>& b) {
  const double values = static_cast<double>(g.batch * g.cells);
  a.resize(count * g.channels), b.resize(count * g.channels);
  bool used = false;
  for (int64_t i = 0; i < count * g.channels; ++i) {
    const double slope = 2.0 * grad_variance[i] / values;
    b[i] = static_cast<float>(slope);
    a[i] = static_cast<float>(grad_mean[i] / values - slope * mean[i]);
    used = used || a[i] != 0.0f || b[i] != 0.0f;
  }
  return used;
}

// `rows` per-channel affine maps for the unit's channels, from (rows,
// channels) scale and shift tensors (e.g. the four maps' normalisations).
void GatherAffine(const float* scale, const float* shift, int64_t rows, int64_t channels,
                  const Unit& unit, Affine* affine) {
  for (int64_t r = 0; r < rows; ++r) {
    GatherChannels(scale + r * channels, 1, channels, unit, &affine[r].scale);
    GatherChannels(shift + r * channels, 1, channels, unit, &affine[r].shift);
  }
}

// ReLU(value * scale + shift): a batch norm and the ReLU after it.
inline Lanes NormalizeRectify(const Lanes& value, const Affine& affine) {
  const Lanes z = value * affine.scale + affine.shift;
  return z > 0.0f ? z : kZero;
}

// ---------------------------------------------------------------------------
// The solver. Every plane of a unit is held with a one-cell ghost border,
// (height + 2) x (width + 2) cells, so the stencil's neighbours are plain
// offsets (+-1 cell along y, +-1 row along x) with no index tables and no
// branches; the border is refilled by the boundary's rule after each step.
// ---------------------------------------------------------------------------

// How a ghost border is filled: from the opposite edge (periodic), from the
// nearest edge (neumann), with zeros (dirichlet), or with the nearest edge
// negated (the transposed central difference under neumann, see Backward).
enum class Fill { kWrap, kEdge, kZero, kNegatedEdge };

Fill FillOf(Boundary boundary) {
  switch (boundary) {
    case Boundary::kPeriodic: return Fill::kWrap;
    case Boundary::kNeumann: return Fill::kEdge;
    case Boundary::kDirichlet: return Fill::kZero;
  }
  return Fill::kZero;
}

// A padded plane's geometry.
struct Grid {
  int64_t height, width, row, size;

  Grid(int64_t height, int64_t width)
      : height(height), width(width), row(width + 2), size((height + 2) * (width + 2)) {}

  // Index of cell (i, j), -1 <= i <= height, -1 <= j <= width.
  int64_t at(int64_t i, int64_t j) const { return (i + 1) * row + j + 1; }

  // Fills the border of `plane` (corners are never read).
  template <typename T>
  void FillBorder(T* plane, Fill fill) const {
    FillGhostRows(plane, fill);
    for (int64_t i = 0; i < height; ++i) FillRowEnds(plane, i, fill);
  }

  // Fills the rows above and below the interior (not their corners).
  template <typename T>
  void FillGhostRows(T* plane, Fill fill) const {
    const T zero = {};
    T* top = plane + at(-1, 0);
    T* bottom = plane + at(height, 0);
    const T* first = plane + at(0, 0);
    const T* last = plane + at(height - 1, 0);
    switch (fill) {
      case Fill::kWrap: std::copy(last, last + width, top), std::copy(first, first + width, bottom);
        break;
      case Fill::kEdge: std::copy(first, first + width, top), std::copy(last, last + width, bottom);
        break;
      case Fill::kZero: std::fill(top, top + width, zero), std::fill(bottom, bottom + width, zero);
        break;
      case Fill::kNegatedEdge:
        if constexpr (std::is_same_v<T, Lanes>) {
          for (int64_t j = 0; j < width; ++j) top[j] = -first[j], bottom[j] = -last[j];
        }
        break;
    }
  }

  // Fills the two ghost cells of row i.
  template <typename T>
  void FillRowEnds(T* plane, int64_t i, Fill fill) const {
    T* r = plane + at(i, 0);
    switch (fill) {
      case Fill::kWrap: r[-1] = r[width - 1], r[width] = r[0]; break;
      case Fill::kEdge: r[-1] = r[0], r[width] = r[width - 1]; break;
      case Fill::kZero: r[-1] = T{}, r[width] = T{}; break;
      case Fill::kNegatedEdge:
        if constexpr (std::is_same_v<T, Lanes>) r[-1] = -r[0], r[width] = -r[width - 1];
        break;
    }
  }

  // Copies the unit's channels of an NHWC tensor into the interior of a
  // padded plane; with `rectify`, as ReLU(value * scale + shift).
  void Gather(const Geometry& g, const float* tensor, const Unit& unit, Lanes* plane,
              const Affine* rectify = nullptr) const {
    const Affine identity = {kZero, kZero};
    const Affine& affine = rectify ? *rectify : identity;
    if (unit.block == kLanes) {
      rectify ? GatherRows<true, true>(g, tensor, unit, plane, affine)
              : GatherRows<true, false>(g, tensor, unit, plane, affine);
    } else {
      rectify ? GatherRows<false, true>(g, tensor, unit, plane, affine)
              : GatherRows<false, false>(g, tensor, unit, plane, affine);
    }
  }

  // The interior of a padded plane into the unit's channels of an NHWC tensor.
  void Scatter(const Geometry& g, const Lanes* plane, const Unit& unit, float* tensor) const {
    if (unit.block == kLanes) {
      ScatterRows<true>(g, plane, unit, tensor);
    } else {
      ScatterRows<false>(g, plane, unit, tensor);
    }
  }

  template <bool kFull, bool kRectify>
  void GatherRows(const Geometry& g, const float* tensor, const Unit& unit, Lanes* plane,
                  const Affine affine) const {
    const float* base = g.Base(tensor, unit);
    const int64_t channels = g.channels, block = unit.block, rows = height, columns = width;
    for (int64_t i = 0; i < rows; ++i) {
      Lanes* r = plane + at(i, 0);
      const float* source = base + i * columns * channels;
      for (int64_t j = 0; j < columns; ++j) {
        const Lanes value = Load<kFull>(source + j * channels, block);
        r[j] = kRectify ? NormalizeRectify(value, affine) : value;
      }
    }
  }

  template <bool kFull>
  void ScatterRows(const Geometry& g, const Lanes* plane, const Unit& unit, float* tensor) const {
    float* base = g.Base(tensor, unit);
    const int64_t channels = g.channels, block = unit.block, rows = height, columns = width;
    for (int64_t i = 0; i < rows; ++i) {
      const Lanes* r = plane + at(i, 0);
      float* target = base + i * columns * channels;
      for (int64_t j = 0; j < columns; ++j) Store<kFull>(r[j], target + j * channels, block);
    }
  }
};

// Runs `body(q)` for the index q of every interior cell, row by row.
template <typename Body>
inline void ForEachCell(const Grid& grid, Body body) {
  for (int64_t i = 0; i < grid.height; ++i) {
    const int64_t first = grid.at(i, 0);
    for (int64_t q = first; q < first + grid.width; ++q) body(q);
  }
}

// Sizes `plane` for `grid` and zeroes its border, corners included (the 3x3
// window reads them).
void ZeroBorder(const Grid& grid, Plane& plane) {
  plane.resize(grid.size);
  grid.FillBorder(plane.data(), Fill::kZero);
  for (int64_t i : {int64_t{-1}, grid.height}) {
    for (int64_t j : {int64_t{-1}, grid.width}) plane[grid.at(i, j)] = kZero;
  }
}

// The step's seven coefficient maps at one cell, all divided through by L:
// H^{k+1} = a H^{k-1} + b H^k + sum_n c_n S_n(H^k) + driven, driven = s f.
// (inv = 1 / L, for the gradient.)
struct Coefficients {
  Lanes a, b, x_next, x_previous, y_next, y_previous, driven, inv;

  // H^{k+1} at the cell whose H^k is h[0] (neighbours h[+-1], h[+-row]).
  Lanes Step(const Lanes& previous, const Lanes* h, int64_t row) const {
    return a * previous + driven + b * h[0] + x_next * h[row] + x_previous * h[-row] +
           y_next * h[1] + y_previous * h[-1];
  }
};

// The border of the coefficient maps that the adjoint gathers from (see
// Backward): wrapped (periodic); under neumann, the ghost cell beyond an
// edge carries the edge cell's own outward coefficient (an edge cell is its
// own neighbour there); under dirichlet it is never used (G's border is 0).
void FillCoefficientBorder(const Grid& grid, Boundary boundary, Coefficients* c) {
  grid.FillBorder(c, boundary == Boundary::kPeriodic ? Fill::kWrap : Fill::kEdge);
  if (boundary != Boundary::kNeumann) return;
  for (int64_t j = 0; j < grid.width; ++j) {
    c[grid.at(-1, j)].x_next = c[grid.at(0, j)].x_previous;
    c[grid.at(grid.height, j)].x_previous = c[grid.at(grid.height - 1, j)].x_next;
  }
  for (int64_t i = 0; i < grid.height; ++i) {
    c[grid.at(i, -1)].y_next = c[grid.at(i, 0)].y_previous;
    c[grid.at(i, grid.width)].y_previous = c[grid.at(i, grid.width - 1)].y_next;
  }
}

// One unit's forward pass: the inputs' planes, the coefficient maps and the states.
struct Forward {
  // f only when the states are kept and f is not H^0 (then `source` is
  // states[1]): H^{-1} = f, which the gradient's sums read.
  Plane f, u, v;
  const Lanes* source = nullptr;
  std::vector<Coefficients> c;
  // states[k + 1] = H^k for k = 0 .. K (all of them when kept, else three
  // rotating); H^{-1} is f.
  std::vector<Plane> states;
  // With an output: the unit's sum and sum of squares of H^K per channel
  // (the batch statistics of the output batch norm, summed as H^K is written).
  Doubles moments[2];

  // Loads the unit, computes the maps and runs the K steps. With `output`
  // (the forward op), H^K goes straight into that NHWC tensor; else every
  // state is kept (the gradient needs H^{-1} .. H^K) and H^K is returned.
  // With s.rectify, map m is ReLU(input * affine[m].scale + affine[m].shift).
  template <bool kFull>
  const Plane* Run(const Geometry& g, const Grid& grid, const Unit& unit, const Settings& s,
                   const float* const inputs[6], const Affine affine[4], float* output) {
    const bool keep_all = output == nullptr;
    // H^0 is f (one tensor): read once.
    const bool shared = inputs[1] == inputs[0];
    const size_t count = keep_all ? s.steps + 2 : 3;
    if (states.size() < count) states.resize(count);
    for (size_t i = 0; i < count; ++i) states[i].resize(grid.size);
    for (Plane* plane : {&u, &v}) plane->resize(grid.size);
    if (keep_all) {
      if (!shared) f.resize(grid.size);
      source = shared ? states[1].data() : f.data();
    }
    // The coefficient maps, unless one step uses them once.
    const bool store_maps = keep_all || s.steps > 1;
    if (store_maps) c.resize(grid.size);
    grid.Gather(g, inputs[1], unit, states[1].data());
    grid.Gather(g, inputs[4], unit, u.data(), s.rectify ? &affine[2] : nullptr);
    grid.Gather(g, inputs[5], unit, v.data(), s.rectify ? &affine[3] : nullptr);
    const Fill fill = FillOf(s.boundary);
    for (Plane* plane : {&states[1], &u, &v}) grid.FillBorder(plane->data(), fill);

    // One pass: f, D_x and D_y straight from the tensors, the maps (as in
    // solver.stencil_coefficients), and the first step.
    const Settings k = s;  // local copies: the stores below cannot alias them
    const Affine n_x = affine[0], n_y = affine[1];
    const int64_t row = grid.row, block = unit.block, channels = g.channels;
    const float *in_f = g.Base(inputs[0], unit), *in_dx = g.Base(inputs[2], unit),
                *in_dy = g.Base(inputs[3], unit);
    const Lanes *pu = u.data(), *pv = v.data(), *h = states[1].data();
    Lanes* pf = keep_all && !shared ? f.data() : nullptr;
    Coefficients* pc = c.data();
    Lanes* next = s.steps == 1 && !keep_all ? nullptr : states[2].data();
    float* out = s.steps == 1 && output ? g.Base(output, unit) : nullptr;
    Doubles sum = {}, squares = {};
    for (int64_t i = 0; i < grid.height; ++i) {
      const int64_t first = grid.at(i, 0), tensor_row = i * grid.width * channels;
      Lanes row_sum = kZero, row_squares = kZero;
      for (int64_t j = 0; j < grid.width; ++j) {
        const int64_t q = first + j, t = tensor_row + j * channels;
        const Lanes f_q = shared ? h[q] : Load<kFull>(in_f + t, block);
        Lanes d_x_q = Load<kFull>(in_dx + t, block), d_y_q = Load<kFull>(in_dy + t, block);
        if (k.rectify) {
          // ReLU: the gradient's mask is then (map > 0), as pre > 0 exactly when ReLU(pre) > 0.
          d_x_q = NormalizeRectify(d_x_q, n_x);
          d_y_q = NormalizeRectify(d_y_q, n_y);
        }
        if (pf) pf[q] = f_q;
        const Lanes u_x = (pu[q + row] - pu[q - row]) * k.half_over_dx;
        const Lanes v_y = (pv[q + 1] - pv[q - 1]) * k.half_over_dy;
        const Lanes a_x = pu[q] * k.dt_over_dx, a_y = pv[q] * k.dt_over_dy;
        const Lanes two_b_x = d_x_q * k.two_dt_over_dx2;
        const Lanes two_b_y = d_y_q * k.two_dt_over_dy2;
        const Lanes inv = 1.0f / (1.0f + two_b_x + two_b_y);
        const Coefficients m = {(1.0f - two_b_x - two_b_y) * inv,
                                (u_x + v_y) * k.minus_two_dt * inv,
                                (two_b_x - a_x) * inv, (two_b_x + a_x) * inv,
                                (two_b_y - a_y) * inv, (two_b_y + a_y) * inv,
                                k.two_dt * inv * f_q, inv};
        if (store_maps) pc[q] = m;
        const Lanes h_1 = m.Step(f_q, h + q, row);
        if (out) {
          Store<kFull>(h_1, out + t, block);
          row_sum += h_1, row_squares += h_1 * h_1;
        } else {
          next[q] = h_1;
        }
      }
      if (out) sum += Widen(row_sum), squares += Widen(row_squares);
    }
    // The adjoint reads the maps across the border; the forward never does.
    if (keep_all) FillCoefficientBorder(grid, s.boundary, c.data());
    if (next) grid.FillBorder(next, fill);
    // The other steps, from the planes; H^{-1} = f is only read by the first.
    // Two steps per sweep where there are two left: row t of one step, then
    // row t - 1 of the next (which needs rows t - 2 .. t of the first), so
    // each coefficient row is read twice while it is still in L1, not once
    // per sweep from L2 (the steps' main cost). The rows that need the
    // first step's ghost rows (0 and height - 1) follow the sweep.
    auto plane = [&](int k) { return states[keep_all ? k + 1 : (k + 1) % 3].data(); };
    float* base = output ? g.Base(output, unit) : nullptr;
    // Row i of H^{k+1}, into its plane (its ends filled), or with
    // kOutput (the last step of the forward op) into the output tensor.
    auto step_row = [&](int k, int64_t i, auto output_row) {
      constexpr bool kOutput = decltype(output_row)::value;
      const int64_t first = grid.at(i, 0);
      const Lanes* previous = plane(k - 1) + first;
      const Lanes* h_k = plane(k) + first;
      const Coefficients* m = pc + first;
      Lanes* after_k = kOutput ? nullptr : plane(k + 1) + first;
      float* out_row = kOutput ? base + i * grid.width * channels : nullptr;
      Lanes row_sum = kZero, row_squares = kZero;
      for (int64_t j = 0; j < grid.width; ++j) {
        const Lanes h_next = m[j].Step(previous[j], h_k + j, row);
        if (kOutput) {
          Store<kFull>(h_next, out_row + j * channels, block);
          row_sum += h_next, row_squares += h_next * h_next;
        } else {
          after_k[j] = h_next;
        }
      }
      if (kOutput) {
        sum += Widen(row_sum), squares += Widen(row_squares);
      } else {
        grid.FillRowEnds(plane(k + 1), i, fill);
      }
    };
    auto step_rows = [&](int k, int64_t begin, int64_t end, bool to_output) {
      for (int64_t i = begin; i < end; ++i) {
        to_output ? step_row(k, i, std::true_type()) : step_row(k, i, std::false_type());
      }
    };
    for (int k = 1; k < s.steps;) {  // H^{k+1} (and H^{k+2}) from H^{k-1}, H^k
      const int count = k + 2 <= s.steps ? 2 : 1;
      const bool to_output = !keep_all && k + count == s.steps;
      if (count == 2) {
        // H^{k+2} overwrites H^{k-1}'s plane without keep_all: row t of
        // H^{k+1} has read row t of H^{k-1} (its only cell there) already.
        for (int64_t t = 0; t < grid.height; ++t) {
          step_rows(k, t, t + 1, false);
          if (t >= 2) step_rows(k + 1, t - 1, t, to_output);
        }
        grid.FillGhostRows(plane(k + 1), fill);  // (step_row filled the row ends)
        step_rows(k + 1, 0, 1, to_output);
        if (grid.height > 1) step_rows(k + 1, grid.height - 1, grid.height, to_output);
      } else {
        step_rows(k, 0, grid.height, to_output);
      }
      if (!to_output) grid.FillGhostRows(plane(k + count), fill);
      k += count;
    }
    moments[0] = sum, moments[1] = squares;
    return keep_all ? &states[s.steps + 1] : nullptr;
  }
};

// Sums of the adjoint over the steps, per cell, from which the gradients
// of D_x, D_y, u, v follow (G^{k+1} = dL/dH^{k+1}, sums over k = 0 .. K-1):
//   x   = sum G^{k+1} (S_x+ H^k + S_x- H^k - H^{k-1} - H^{k+1})  -> dL/d(2 B_x) L
//   y   = the same along y                                       -> dL/d(2 B_y) L
//   x_a = sum G^{k+1} (S_x- H^k - S_x+ H^k)                      -> dL/dA_x L
//   y_a = the same along y                                       -> dL/dA_y L
//   b   = sum G^{k+1} H^k                                        -> dL/db
//   g   = sum G^{k+1}                                            -> dL/d driven
// (each map is its numerator over L, and sum_n map_n X_n = H^{k+1}: the
// step itself, which gives the gradient through L in one term).
struct Sums {
  Lanes x, y, x_a, y_a, b, g;
};

// The adjoint pass of one unit. The transposed neighbour maps gather
// through the same offsets as the forward: cell q receives c_x+ G at q - row
// (q is the x+ neighbour of q - row), and so on. With G's border filled by
// the boundary's rule and the coefficient maps' by FillCoefficientBorder,
// that is exact at the edges too: periodic wraps; dirichlet reads zeros;
// under neumann an edge cell is its own ghost, so its outward term comes
// back to itself through the ghost cell.
//
// First G^{K-1} .. G^1, each kept in a plane of its own (Transpose); then
// one pass (Finish) adds up the sums over the steps per cell (in registers),
// computes G^0 and writes the gradients. Accumulating the six sums in
// per-cell planes during the recurrence instead read and wrote six vectors
// per cell and step: most of the adjoint's memory traffic at K > 1.
struct Backward {
  // adjoint[k] = G^k = dL/dH^k for k = 1 .. K (adjoint[0] unused); the
  // gradient of u_x + v_y and of u and v.
  std::vector<Plane> adjoint;
  std::vector<const Lanes*> state_planes, adjoint_planes;  // for SumsAt
  Plane divergence, d_u, d_v;
  // With depth-wise maps (Settings::depthwise): their gradients (padded, zero
  // border) and dL/dH^0 (unpadded cells; + dL/df when shared), kept here
  // for the conv's backward instead of written out.
  Plane d_maps[4], d_initial;
  // With s.rectify, the unit's sums for the normalisations' gradients: map m's
  // z = input * scale + shift has dL/dshift = sum dL/dz (normalization[2 m])
  // and dL/dscale = sum dL/dz input (normalization[2 m + 1]).
  Doubles normalization[8];

  // G^k = b G^{k+1} + sum_n S_n^T(c_n G^{k+1}) + a G^{k+2} at cell q
  // (kSecond: there is a G^{k+2}, i.e. k + 2 <= K).
  template <bool kSecond>
  static inline Lanes Transposed(const Coefficients* c, int64_t row, const Lanes* g_next,
                                 const Lanes* g_second, int64_t q) {
    Lanes into = c[q].b * g_next[q] + c[q - row].x_next * g_next[q - row] +
                 c[q + row].x_previous * g_next[q + row] + c[q - 1].y_next * g_next[q - 1] +
                 c[q + 1].y_previous * g_next[q + 1];
    if (kSecond) into += c[q].a * g_second[q];
    return into;
  }

  // G^k for k = K-1 .. 1, borders filled.
  void Transpose(const Grid& grid, const Settings& s, const Forward& forward) {
    const Coefficients* c = forward.c.data();
    const int64_t row = grid.row;
    const Fill fill = FillOf(s.boundary);
    for (int k = s.steps - 1; k >= 1; --k) {
      const Lanes* g_next = adjoint[k + 1].data();
      Lanes* g_k = adjoint[k].data();
      if (k + 2 <= s.steps) {
        const Lanes* g_second = adjoint[k + 2].data();
        ForEachCell(grid, [&](int64_t q) {
          g_k[q] = Transposed<true>(c, row, g_next, g_second, q);
        });
      } else {
        ForEachCell(grid, [&](int64_t q) {
          g_k[q] = Transposed<false>(c, row, g_next, nullptr, q);
        });
      }
      grid.FillBorder(g_k, fill);
    }
  }

  // The sums at cell q, from step K-1 down to 0 (the order the gradient
  // has always added them in), in registers: `h[k + 1]` is H^k's plane
  // (k = -1 .. K), `g[k]` G^k's.
  static Sums SumsAt(int steps, const Lanes* const* h, const Lanes* const* g, int64_t q,
                     int64_t row) {
    Sums sq = {};
    for (int k = steps - 1; k >= 0; --k) {
      const Lanes* h_k = h[k + 1] + q;
      const Lanes gq = g[k + 1][q];
      const Lanes x_next = h_k[row], x_previous = h_k[-row];
      const Lanes y_next = h_k[1], y_previous = h_k[-1];
      const Lanes outer = h[k][q] + h[k + 2][q];
      sq.x = gq * (x_next + x_previous - outer) + sq.x;
      sq.y = gq * (y_next + y_previous - outer) + sq.y;
      sq.x_a = gq * (x_previous - x_next) + sq.x_a;
      sq.y_a = gq * (y_previous - y_next) + sq.y_a;
      sq.b = gq * h_k[0] + sq.b;
      sq.g = gq + sq.g;
    }
    return sq;
  }

  // Cell by cell: the sums, G^0 (from G^1 and G^2), G^{-1} = a G^1 (H^{-1}
  // is f), and from them dL/dH^0, dL/df, dL/dD_x and dL/dD_y (through the
  // normalisation, whose inputs it reads again) and the planes for u and v.
  template <bool kFull>
  void Finish(const Geometry& g, const Grid& grid, const Settings& settings, const Unit& unit,
              const Forward& forward, const float* const inputs[6], const Affine affine[4],
              float* const outputs[6]) {
    const Settings s = settings;  // local copies: the stores below cannot alias them
    const Lanes scale_x = affine[0].scale, scale_y = affine[1].scale;
    const int64_t row = grid.row, block = unit.block, channels = g.channels;
    const float *in_dx = g.Base(inputs[2], unit), *in_dy = g.Base(inputs[3], unit);
    Doubles sums_x = {}, sums_x_in = {}, sums_y = {}, sums_y_in = {};
    const Coefficients* c = forward.c.data();
    state_planes.assign(1, forward.source);
    for (int k = 0; k <= s.steps; ++k) state_planes.push_back(forward.states[k + 1].data());
    adjoint_planes.assign(1, nullptr);
    for (int k = 1; k <= s.steps; ++k) adjoint_planes.push_back(adjoint[k].data());
    const Lanes *const *h_planes = state_planes.data(), *const *g_planes = adjoint_planes.data();
    const Lanes* g1 = adjoint[1].data();
    const Lanes* g2 = s.steps >= 2 ? adjoint[2].data() : nullptr;
    Lanes *div = divergence.data(), *du = d_u.data(), *dv = d_v.data();
    float *out_f = g.Base(outputs[0], unit), *out_h = g.Base(outputs[1], unit);
    float *out_dx = g.Base(outputs[2], unit), *out_dy = g.Base(outputs[3], unit);
    Lanes* keep_initial = s.any_depthwise ? d_initial.data() : nullptr;
    Lanes* keep_dx = s.depthwise[0] >= 0 ? d_maps[0].data() : nullptr;
    Lanes* keep_dy = s.depthwise[1] >= 0 ? d_maps[1].data() : nullptr;
    for (int64_t i = 0; i < grid.height; ++i) {
      const int64_t first = grid.at(i, 0), tensor_row = i * grid.width * channels;
      Lanes row_x = kZero, row_x_in = kZero, row_y = kZero, row_y_in = kZero;
      for (int64_t j = 0; j < grid.width; ++j) {
        const int64_t q = first + j, t = tensor_row + j * channels;
        const Sums sq = SumsAt(s.steps, h_planes, g_planes, q, row);
        const Coefficients& cq = c[q];
        const Lanes gq = g1[q];
        const Lanes into = g2 ? Transposed<true>(c, row, g1, g2, q)
                              : Transposed<false>(c, row, g1, nullptr, q);  // G^0
        const Lanes inv = cq.inv;
        const Lanes d_f = cq.a * gq + sq.g * s.two_dt * inv;  // f drives every step
        const Lanes d_initial_q = s.shared_initial ? d_f + into : into;
        if (!s.shared_initial) Store<kFull>(d_f, out_f + t, block);
        if (keep_initial) {
          keep_initial[i * grid.width + j] = d_initial_q;
        } else {
          Store<kFull>(d_initial_q, (s.shared_initial ? out_f : out_h) + t, block);
        }
        Lanes d_dx = sq.x * inv * s.two_dt_over_dx2, d_dy = sq.y * inv * s.two_dt_over_dy2;
        if (s.rectify) {
          // Through the ReLUs (zero where the map was clamped) to z, then to
          // the input of z = input * scale + shift.
          // (The masks as the forward pass computed the maps: cheaper than
          // keeping the maps in planes.)
          const Lanes in_x = Load<kFull>(in_dx + t, block), in_y = Load<kFull>(in_dy + t, block);
          d_dx = NormalizeRectify(in_x, affine[0]) > 0.0f ? d_dx : kZero;
          d_dy = NormalizeRectify(in_y, affine[1]) > 0.0f ? d_dy : kZero;
          row_x += d_dx, row_x_in += d_dx * in_x;
          row_y += d_dy, row_y_in += d_dy * in_y;
          d_dx *= scale_x, d_dy *= scale_y;
        }
        if (keep_dx) {
          keep_dx[q] = d_dx;
        } else {
          Store<kFull>(d_dx, out_dx + t, block);
        }
        if (keep_dy) {
          keep_dy[q] = d_dy;
        } else {
          Store<kFull>(d_dy, out_dy + t, block);
        }
        div[q] = sq.b * s.minus_two_dt * inv;  // dL/d(u_x + v_y)
        du[q] = sq.x_a * inv * s.dt_over_dx;
        dv[q] = sq.y_a * inv * s.dt_over_dy;
      }
      if (s.rectify) {
        sums_x += Widen(row_x), sums_x_in += Widen(row_x_in);
        sums_y += Widen(row_y), sums_y_in += Widen(row_y_in);
      }
    }
    normalization[0] = sums_x, normalization[1] = sums_x_in;
    normalization[2] = sums_y, normalization[3] = sums_y_in;
  }

  // The gradient of a velocity map (`gradient`, before its ReLU) into its
  // output, or into the padded plane `keep` if given: with s.rectify masked
  // by the ReLU, its normalisation's sums added to `sums` (dL/dshift,
  // dL/dscale) and scaled to the map's input.
  template <bool kFull>
  static void ScatterVelocity(const Geometry& g, const Grid& grid, const Unit& unit,
                              const Settings& s, const Lanes* gradient, const Lanes* map,
                              const float* input, const Affine& affine, float* output,
                              Lanes* keep, Doubles sums[2]) {
    if (!s.rectify && !keep) return grid.Scatter(g, gradient, unit, output);
    const float* in = g.Base(input, unit);
    float* out = g.Base(output, unit);
    const Lanes scale = affine.scale;
    const int64_t channels = g.channels, block = unit.block;
    Doubles total = {}, total_in = {};
    for (int64_t i = 0; i < grid.height; ++i) {
      const Lanes* d = gradient + grid.at(i, 0);
      const Lanes* m = map + grid.at(i, 0);
      Lanes* kept = keep ? keep + grid.at(i, 0) : nullptr;
      const int64_t tensor_row = i * grid.width * channels;
      Lanes row = kZero, row_in = kZero;
      for (int64_t j = 0; j < grid.width; ++j) {
        const int64_t t = tensor_row + j * channels;
        Lanes d_input = d[j];
        if (s.rectify) {
          const Lanes d_z = m[j] > 0.0f ? d[j] : kZero;
          row += d_z, row_in += d_z * Load<kFull>(in + t, block);
          d_input = d_z * scale;
        }
        if (kept) {
          kept[j] = d_input;
        } else {
          Store<kFull>(d_input, out + t, block);
        }
      }
      total += Widen(row), total_in += Widen(row_in);
    }
    sums[0] = total, sums[1] = total_in;
  }

  // `share` (if given): the part of dL/dH^K that comes through H^K's batch
  // statistics, H^K * share.scale + share.shift, added to grad_solution.
  template <bool kFull>
  void Run(const Geometry& g, const Grid& grid, const Unit& unit, const Settings& s,
           const Forward& forward, const float* const inputs[6], const Affine affine[4],
           const float* grad_solution, const Affine* share, float* const outputs[6]) {
    if (adjoint.size() < static_cast<size_t>(s.steps) + 1) adjoint.resize(s.steps + 1);
    for (int k = 1; k <= s.steps; ++k) adjoint[k].resize(grid.size);
    for (Plane* plane : {&divergence, &d_u, &d_v}) plane->resize(grid.size);
    if (s.any_depthwise) d_initial.resize(grid.height * grid.width);
    for (int m = 0; m < 4; ++m) {
      if (s.depthwise[m] >= 0) ZeroBorder(grid, d_maps[m]);
    }
    Lanes* g_last = adjoint[s.steps].data();  // G^K
    grid.Gather(g, grad_solution, unit, g_last);
    if (share) {
      const Affine through_statistics = *share;
      const Lanes* solution = forward.states[s.steps + 1].data();
      ForEachCell(grid, [&](int64_t q) {
        g_last[q] += solution[q] * through_statistics.scale + through_statistics.shift;
      });
    }
    grid.FillBorder(g_last, FillOf(s.boundary));
    Transpose(grid, s, forward);
    Finish<kFull>(g, grid, s, unit, forward, inputs, affine, outputs);
    // u_x = (u[x+1] - u[x-1]) / (2 dx): the transposed central differences.
    // Under neumann the edge cell is its own ghost: the negated edge value
    // as the border gives its term.
    const Settings settings = s;
    Lanes *div = divergence.data(), *du = d_u.data(), *dv = d_v.data();
    grid.FillBorder(div, s.boundary == Boundary::kNeumann ? Fill::kNegatedEdge
                                                          : FillOf(s.boundary));
    const int64_t row = grid.row;
    ForEachCell(grid, [&](int64_t q) {
      du[q] += (div[q - row] - div[q + row]) * settings.half_over_dx;
      dv[q] += (div[q - 1] - div[q + 1]) * settings.half_over_dy;
    });
    ScatterVelocity<kFull>(g, grid, unit, s, du, forward.u.data(), inputs[4], affine[2],
                           outputs[4], s.depthwise[2] >= 0 ? d_maps[2].data() : nullptr,
                           &normalization[4]);
    ScatterVelocity<kFull>(g, grid, unit, s, dv, forward.v.data(), inputs[5], affine[3],
                           outputs[5], s.depthwise[3] >= 0 ? d_maps[3].data() : nullptr,
                           &normalization[6]);
  }
};

struct ForwardAndBackward {
  Forward forward;
  Backward backward;
  // With depth-wise maps: the kernel's taps.
  std::vector<Lanes> taps;
};

Geometry CheckInputs(OpKernelContext* context, int count) {
  const TensorShape& shape = context->input(0).shape();
  if (shape.dims() != 4) {
    context->CtxFailure(InvalidArgument("PdeKerasSolve: inputs must be rank 4 (NHWC), got ",
                                        shape.DebugString()));
    return Geometry(TensorShape({0, 0, 0, 0}));
  }
  for (int i = 1; i < count; ++i) {
    if (context->input(i).shape() != shape) {
      context->CtxFailure(InvalidArgument("PdeKerasSolve: input ", i, " has shape ",
                                          context->input(i).shape().DebugString(),
                                          ", expected ", shape.DebugString()));
      return Geometry(TensorShape({0, 0, 0, 0}));
    }
  }
  // The maps' normalisations (inputs 6 and 7): (4, channels).
  const TensorShape affine({4, shape.dim_size(3)});
  for (int i : {6, 7}) {
    if (context->input(i).shape() != affine) {
      context->CtxFailure(InvalidArgument("PdeKerasSolve: input ", i, " has shape ",
                                          context->input(i).shape().DebugString(),
                                          ", expected ", affine.DebugString()));
      return Geometry(TensorShape({0, 0, 0, 0}));
    }
  }
  return Geometry(shape);
}

// The solver ops' `kernel` list input, checked against Settings::depthwise:
// one (3, 3, channels, count) kernel whose maps the depth-wise rows name, or
// none without them. Returns the kernel (nullptr: none, or a failed check).
const Tensor* CheckKernel(OpKernelContext* context, const Settings& s, const Geometry& g) {
  OpInputList kernels;
  if (!context->input_list("kernel", &kernels).ok() || kernels.size() != (s.any_depthwise ? 1 : 0)) {
    context->CtxFailure(InvalidArgument("PdeKerasSolve: depthwise maps need exactly one kernel, "
                                        "other maps none"));
    return nullptr;
  }
  if (!s.any_depthwise) return nullptr;
  const Tensor& kernel = kernels[0];
  const bool shaped = kernel.dims() == 4 && kernel.dim_size(0) == 3 && kernel.dim_size(1) == 3 &&
                      kernel.dim_size(2) == g.channels;
  for (int m = 0; m < 4 && shaped; ++m) {
    if (s.depthwise[m] >= kernel.dim_size(3)) {
      context->CtxFailure(InvalidArgument("PdeKerasSolve: depthwise names kernel map ",
                                          s.depthwise[m], " of ", kernel.dim_size(3)));
      return nullptr;
    }
  }
  if (!shaped) {
    context->CtxFailure(InvalidArgument("PdeKerasSolve: kernel must be shaped (3, 3, ", g.channels,
                                        ", maps), got ", kernel.shape().DebugString()));
    return nullptr;
  }
  return &kernel;
}

// Workspaces (a unit's buffers, a megabyte or so) kept from call to call:
// fresh ones on every call would each be new pages for the kernel to fault
// in and zero. One per concurrently running shard; an op kernel holds one
// pool, which concurrent calls share.
template <typename Workspace>
class WorkspacePool {
 public:
  std::unique_ptr<Workspace> Acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return std::make_unique<Workspace>();
    std::unique_ptr<Workspace> workspace = std::move(free_.back());
    free_.pop_back();
    return workspace;
  }

  void Release(std::unique_ptr<Workspace> workspace) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(workspace));
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Workspace>> free_;
};

// Runs `work(unit, workspace)` for every unit on TensorFlow's CPU thread
// pool; each shard (a range of units on one thread) takes a Workspace from
// `pool`, whose buffers the shard's units reuse. `cost_per_unit` is in CPU
// cycles per unit, from one-thread timings of each op on (1, 32, 32, 16)
// inputs in cache (AVX2 build, 2.8 GHz Xeon; TensorFlow's per-op overhead
// included): the pool splits the work only where the total outweighs its
// ~1e5-cycle start-up cost per thread, so small calls stay on one thread.
template <typename Workspace, typename Work>
void ForEachUnit(OpKernelContext* context, const Geometry& g, int64_t cost_per_unit,
                 WorkspacePool<Workspace>& workspaces, Work work) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  // (This overload is deprecated in TensorFlow 2.21 in favour of
  // SchedulingParams::Adaptive, which older versions lack; it does the same.)
  // (The costs were measured on 8-channel units.)
  pool->ParallelFor(g.units(), cost_per_unit * kLanes / 8, [&](int64_t begin, int64_t end) {
    std::unique_ptr<Workspace> workspace = workspaces.Acquire();
    for (int64_t i = begin; i < end; ++i) work(g.unit(i), *workspace);
    workspaces.Release(std::move(workspace));
  });
}

// ---------------------------------------------------------------------------
// The coefficient maps' depth-wise 3x3 convolution ("same", zero padding):
// map_k[n, i, j, c] = sum_{a, b} x[n, i + a - 1, j + b - 1, c] kernel[a, b, c, k].
// Its pieces, shared by the depth-wise ops (below) and the solver's gradient,
// which can take the maps' gradient through the conv itself.
// ---------------------------------------------------------------------------

// The 3x3 window of a zero-bordered plane at (i, j) (`row0`: row i of the
// padded plane, i.e. the window's top row) times the taps t[a * 3 + b].
inline Lanes Convolve3x3(const Lanes* row0, int64_t padded_width, int64_t j, const Lanes t[9]) {
  const Lanes* row1 = row0 + padded_width;
  const Lanes* row2 = row1 + padded_width;
  return row0[j] * t[0] + row0[j + 1] * t[1] + row0[j + 2] * t[2] + row1[j] * t[3] +
         row1[j + 1] * t[4] + row1[j + 2] * t[5] + row2[j] * t[6] + row2[j + 1] * t[7] +
         row2[j + 2] * t[8];
}

// A unit's channels of an NHWC tensor with a zero border: (height + 2) x (width + 2).
void GatherPadded(const Geometry& g, const float* tensor, const Unit& unit, Plane& padded) {
  const Grid grid(g.height, g.width);
  padded.resize(grid.size);
  grid.Gather(g, tensor, unit, padded.data());
  ZeroBorder(grid, padded);
}

// kernel[a, b, c, k] for the unit's channels: taps[(k * 3 + a) * 3 + b].
void GatherTaps(const float* kernel, int64_t channels, int64_t maps, const Unit& unit,
                std::vector<Lanes>& taps) {
  taps.assign(9 * maps, kZero);
  for (int64_t k = 0; k < maps; ++k) {
    for (int64_t t = 0; t < 9; ++t) {
      for (int64_t l = 0; l < unit.block; ++l) {
        taps[k * 9 + t][l] = kernel[(t * channels + unit.channel + l) * maps + k];
      }
    }
  }
}

// One map's share of the depth-wise conv's gradient: `grad` (the input's,
// unpadded cells) += the transposed conv of `padded_g` (the map's gradient,
// zero border), and `sums` = the kernel's gradient, sum x[. + a - 1, . + b - 1] g.
void DepthwiseBackward(int64_t height, int64_t width, const Lanes* padded_x,
                       const Lanes* padded_g, const Lanes taps[9], Lanes* grad, Lanes sums[9]) {
  const int64_t padded_width = width + 2;
  Lanes t[9];  // a local copy: the stores below cannot alias it
  std::copy(taps, taps + 9, t);
  // Two loops, each with few enough live vectors to stay in registers.
  for (int64_t i = 0; i < height; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      // dx[i, j] = sum_{a, b} g[i - a + 1, j - b + 1] kernel[a, b] (padded: + 1).
      const Lanes* g0 = &padded_g[i * padded_width + j];  // rows i - 1 .. i + 1
      const Lanes* g1 = g0 + padded_width;
      const Lanes* g2 = g1 + padded_width;
      grad[i * width + j] += g2[2] * t[0] + g2[1] * t[1] + g2[0] * t[2] +
                             g1[2] * t[3] + g1[1] * t[4] + g1[0] * t[5] +
                             g0[2] * t[6] + g0[1] * t[7] + g0[0] * t[8];
    }
  }
  Lanes s[9] = {};
  for (int64_t i = 0; i < height; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      // d kernel[a, b] += x[i + a - 1, j + b - 1] g[i, j].
      const Lanes gij = padded_g[(i + 1) * padded_width + j + 1];
      const Lanes* x0 = &padded_x[i * padded_width + j];
      const Lanes* x1 = x0 + padded_width;
      const Lanes* x2 = x1 + padded_width;
      s[0] += x0[0] * gij, s[1] += x0[1] * gij, s[2] += x0[2] * gij;
      s[3] += x1[0] * gij, s[4] += x1[1] * gij, s[5] += x1[2] * gij;
      s[6] += x2[0] * gij, s[7] += x2[1] * gij, s[8] += x2[2] * gij;
    }
  }
  std::copy(s, s + 9, sums);
}

// The kernel's gradient (3, 3, C, maps) from per-unit sums
// (`partial[(unit * maps + k) * 9 + tap]`), added up in a fixed order.
void WriteKernelGradient(const Geometry& g, const std::vector<Lanes>& partial, int64_t maps,
                         float* dw) {
  for (int64_t unit = 0; unit < g.units(); ++unit) {
    const Unit u = g.unit(unit);
    for (int64_t k = 0; k < maps; ++k) {
      for (int64_t t = 0; t < 9; ++t) {
        const Lanes& sum = partial[(unit * maps + k) * 9 + t];
        for (int64_t l = 0; l < u.block; ++l) {
          dw[(t * g.channels + u.channel + l) * maps + k] += sum[l];
        }
      }
    }
  }
}

class SolveOp : public OpKernel {
 public:
  explicit SolveOp(OpKernelConstruction* context) : OpKernel(context) { settings_.Init(context); }

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckInputs(context, 6);
    if (!context->status().ok()) return;
    CheckKernel(context, settings_, g);  // (only the gradient uses it)
    if (!context->status().ok()) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &output));
    float* statistics[2];
    for (int i = 0; i < 2; ++i) {
      Tensor* statistic = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(1 + i, TensorShape({g.channels}),
                                                       &statistic));
      statistics[i] = statistic->flat<float>().data();
    }
    std::vector<Doubles> partial(g.units() * 2);  // H^K's moments per unit
    if (g.cells == 0) return WriteStatistics(g, partial, 1, statistics[0], statistics[1]);
    const float* inputs[8];
    for (int i = 0; i < 8; ++i) inputs[i] = context->input(i).flat<float>().data();
    float* out = output->flat<float>().data();
    const Grid grid(g.height, g.width);
    const int64_t cost = g.cells * (36 + 21 * settings_.steps);
    ForEachUnit(context, g, cost, workspaces_, [&](const Unit& unit, Forward& forward) {
      Affine affine[4];
      GatherAffine(inputs[6], inputs[7], 4, g.channels, unit, affine);
      if (unit.block == kLanes) {
        forward.Run<true>(g, grid, unit, settings_, inputs, affine, out);
      } else {
        forward.Run<false>(g, grid, unit, settings_, inputs, affine, out);
      }
      const int64_t index = g.index(unit);
      std::copy(forward.moments, forward.moments + 2, &partial[index * 2]);
    });
    WriteStatistics(g, partial, 1, statistics[0], statistics[1]);
  }

 private:
  Settings settings_;
  WorkspacePool<Forward> workspaces_;
};

class SolveGradOp : public OpKernel {
 public:
  explicit SolveGradOp(OpKernelConstruction* context) : OpKernel(context) {
    settings_.Init(context);
  }

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckInputs(context, 6);
    if (!context->status().ok()) return;
    OP_REQUIRES(context, context->input(9).shape() == context->input(0).shape(),
                InvalidArgument("PdeKerasSolveGrad: grad_solution has shape ",
                                context->input(9).shape().DebugString(), ", expected ",
                                context->input(0).shape().DebugString()));
    for (int i : {8, 10, 11}) {
      OP_REQUIRES(context, context->input(i).shape() == TensorShape({g.channels}),
                  InvalidArgument("PdeKerasSolveGrad: input ", i, " has shape ",
                                  context->input(i).shape().DebugString(), ", expected (",
                                  g.channels, ")"));
    }
    const Tensor* kernel = CheckKernel(context, settings_, g);
    if (!context->status().ok()) return;
    float* outputs[8];
    for (int i = 0; i < 8; ++i) {
      Tensor* output = nullptr;
      // Empty: dL/dH^0 when it is in dL/df, and a depth-wise map's gradient.
      const bool empty = (i == 1 && settings_.shared_initial) ||
                         (i >= 2 && i < 6 && settings_.depthwise[i - 2] >= 0);
      const TensorShape& shape = i >= 6 ? context->input(i).shape() : context->input(0).shape();
      OP_REQUIRES_OK(context, context->allocate_output(i, empty ? TensorShape({0}) : shape,
                                                       &output));
      outputs[i] = output->flat<float>().data();
    }
    std::fill_n(outputs[6], 4 * g.channels, 0.0f);
    std::fill_n(outputs[7], 4 * g.channels, 0.0f);
    float* grad_kernel = nullptr;
    if (kernel) {
      OpOutputList grad_kernels;
      OP_REQUIRES_OK(context, context->output_list("grad_kernel", &grad_kernels));
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, grad_kernels.allocate(0, kernel->shape(), &output));
      grad_kernel = output->flat<float>().data();
      std::fill_n(grad_kernel, output->NumElements(), 0.0f);
    }
    if (g.units() == 0 || g.cells == 0) return;
    const float* inputs[8];
    for (int i = 0; i < 8; ++i) inputs[i] = context->input(i).flat<float>().data();
    const float* grad_solution = context->input(9).flat<float>().data();
    // The share of dL/dH^K through H^K's batch statistics (outputs 1 and 2).
    std::vector<float> share_a, share_b;
    const bool statistics_used = StatisticsShare(
        g, 1, context->input(8).flat<float>().data(), context->input(10).flat<float>().data(),
        context->input(11).flat<float>().data(), share_a, share_b);
    const Grid grid(g.height, g.width);
    const int64_t maps = kernel ? kernel->dim_size(3) : 0;
    int64_t cost = g.cells * (130 + 69 * settings_.steps);
    for (int m = 0; m < 4; ++m) cost += settings_.depthwise[m] >= 0 ? g.cells * 20 : 0;
    // Per unit, the normalisations' sums (Backward::normalization) and the
    // kernel's gradient (as in PdeKerasDepthwiseMapsGrad).
    std::vector<Doubles> partial(settings_.rectify ? g.units() * 8 : 0);
    std::vector<Lanes> kernel_partial(g.units() * 9 * maps, kZero);
    ForEachUnit(context, g, cost, workspaces_,
                                    [&](const Unit& unit, ForwardAndBackward& work) {
      Affine affine[4], share;
      GatherAffine(inputs[6], inputs[7], 4, g.channels, unit, affine);
      if (statistics_used) {
        GatherAffine(share_b.data(), share_a.data(), 1, g.channels, unit, &share);
      }
      const Affine* through_statistics = statistics_used ? &share : nullptr;
      if (unit.block == kLanes) {
        work.forward.Run<true>(g, grid, unit, settings_, inputs, affine, nullptr);
        work.backward.Run<true>(g, grid, unit, settings_, work.forward, inputs, affine,
                                grad_solution, through_statistics, outputs);
      } else {
        work.forward.Run<false>(g, grid, unit, settings_, inputs, affine, nullptr);
        work.backward.Run<false>(g, grid, unit, settings_, work.forward, inputs, affine,
                                 grad_solution, through_statistics, outputs);
      }
      const int64_t index = g.index(unit);
      if (settings_.rectify) {
        std::copy(work.backward.normalization, work.backward.normalization + 8,
                  &partial[index * 8]);
      }
      if (!kernel) return;
      // The depth-wise maps' gradients through their conv, while the unit is
      // in cache: into dL/dH^0 (which the backward pass kept) and the kernel.
      // The conv reads H^0 with a zero border: the forward pass's plane of
      // H^0 (done with), its boundary border zeroed, not a second gather.
      Plane& padded_initial = work.forward.states[1];
      ZeroBorder(grid, padded_initial);
      GatherTaps(kernel->flat<float>().data(), g.channels, maps, unit, work.taps);
      for (int m = 0; m < 4; ++m) {
        const int k = settings_.depthwise[m];
        if (k < 0) continue;
        DepthwiseBackward(g.height, g.width, padded_initial.data(),
                          work.backward.d_maps[m].data(), &work.taps[k * 9],
                          work.backward.d_initial.data(), &kernel_partial[(index * maps + k) * 9]);
      }
      g.Scatter(work.backward.d_initial, unit, outputs[settings_.shared_initial ? 0 : 1]);
    });
    if (kernel) WriteKernelGradient(g, kernel_partial, maps, grad_kernel);
    if (!settings_.rectify) return;
    // normalization[2 m] -> dL/dshift[m], normalization[2 m + 1] -> dL/dscale[m].
    const std::vector<double> sums = SumOverBatch(g, partial, 8);
    for (int64_t m = 0; m < 4; ++m) {
      for (int64_t c = 0; c < g.channels; ++c) {
        outputs[7][m * g.channels + c] = static_cast<float>(sums[2 * m * g.channels + c]);
        outputs[6][m * g.channels + c] = static_cast<float>(sums[(2 * m + 1) * g.channels + c]);
      }
    }
  }

 private:
  Settings settings_;
  WorkspacePool<ForwardAndBackward> workspaces_;
};


// ---------------------------------------------------------------------------
// The Global layer's output: ReLU(H^K * scale + shift), its batch norm (the
// statistics from PdeKerasSolve, or the moving averages) and ReLU in one
// pass; the gradient op also gives the sums for scale and shift.
// ---------------------------------------------------------------------------

// Inputs x (NHWC), scale and shift (channels), checked: the geometry.
Geometry CheckNormalizeInputs(OpKernelContext* context, int count) {
  const TensorShape& shape = context->input(0).shape();
  if (shape.dims() != 4) {
    context->CtxFailure(InvalidArgument("PdeKerasNormalizeRelu: x must be rank 4 (NHWC), got ",
                                        shape.DebugString()));
    return Geometry(TensorShape({0, 0, 0, 0}));
  }
  for (int i = 1; i < count; ++i) {
    // scale and shift: one value per channel (any shape); then a tensor like x.
    const bool ok = i < 3 ? context->input(i).NumElements() == shape.dim_size(3)
                          : context->input(i).shape() == shape;
    if (!ok) {
      context->CtxFailure(InvalidArgument("PdeKerasNormalizeRelu: input ", i, " has shape ",
                                          context->input(i).shape().DebugString(), ", expected ",
                                          i < 3 ? "one value per channel of " : "",
                                          shape.DebugString()));
      return Geometry(TensorShape({0, 0, 0, 0}));
    }
  }
  return Geometry(shape);
}

// The unit's channels of the per-channel scale (input 1) and shift (input 2).
Affine GatherNormalization(OpKernelContext* context, const Geometry& g, const Unit& unit) {
  Affine affine;
  GatherAffine(context->input(1).flat<float>().data(), context->input(2).flat<float>().data(),
               1, g.channels, unit, &affine);
  return affine;
}

struct NoWorkspace {};

class NormalizeReluOp : public OpKernel {
 public:
  explicit NormalizeReluOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckNormalizeInputs(context, 3);
    if (!context->status().ok()) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &output));
    if (g.units() == 0 || g.cells == 0) return;
    const float* x = context->input(0).flat<float>().data();
    float* y = output->flat<float>().data();
    ForEachUnit(context, g, g.cells * 7, workspaces_,
                [&](const Unit& unit, NoWorkspace&) {
      const Affine a = GatherNormalization(context, g, unit);
      unit.block == kLanes ? Run<true>(g, unit, a, x, y) : Run<false>(g, unit, a, x, y);
    });
  }

 private:
  template <bool kFull>
  static void Run(const Geometry& g, const Unit& unit, const Affine a, const float* x, float* y) {
    const float* in = g.Base(x, unit);
    float* out = g.Base(y, unit);
    for (int64_t p = 0; p < g.cells; ++p) {
      Store<kFull>(NormalizeRectify(Load<kFull>(in + p * g.channels, unit.block), a),
                   out + p * g.channels, unit.block);
    }
  }

  WorkspacePool<NoWorkspace> workspaces_;
};

// Inputs x, scale, shift, dL/dy -> dL/dx, dL/dscale, dL/dshift.
class NormalizeReluGradOp : public OpKernel {
 public:
  explicit NormalizeReluGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckNormalizeInputs(context, 4);
    if (!context->status().ok()) return;
    float* outputs[3];
    for (int i = 0; i < 3; ++i) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(i, context->input(i).shape(), &output));
      outputs[i] = output->flat<float>().data();
    }
    std::fill_n(outputs[1], g.channels, 0.0f);
    std::fill_n(outputs[2], g.channels, 0.0f);
    if (g.units() == 0 || g.cells == 0) return;
    const float* x = context->input(0).flat<float>().data();
    const float* dy = context->input(3).flat<float>().data();
    std::vector<Doubles> partial(g.units() * 2);  // per unit: dL/dshift, dL/dscale
    ForEachUnit(context, g, g.cells * 15, workspaces_,
                [&](const Unit& unit, NoWorkspace&) {
      const Affine a = GatherNormalization(context, g, unit);
      Doubles* sums = &partial[(g.index(unit)) * 2];
      if (unit.block == kLanes) {
        Run<true>(g, unit, a, x, dy, outputs[0], sums);
      } else {
        Run<false>(g, unit, a, x, dy, outputs[0], sums);
      }
    });
    const std::vector<double> sums = SumOverBatch(g, partial, 2);
    for (int64_t c = 0; c < g.channels; ++c) {
      outputs[2][c] = static_cast<float>(sums[c]);
      outputs[1][c] = static_cast<float>(sums[g.channels + c]);
    }
  }

 private:
  template <bool kFull>
  static void Run(const Geometry& g, const Unit& unit, const Affine a, const float* x,
                  const float* dy, float* dx, Doubles sums[2]) {
    const float *in = g.Base(x, unit), *gradient = g.Base(dy, unit);
    float* out = g.Base(dx, unit);
    Doubles total = {}, total_x = {};
    for (int64_t i = 0; i < g.height; ++i) {
      Lanes row = kZero, row_x = kZero;
      for (int64_t j = 0; j < g.width; ++j) {
        const int64_t t = (i * g.width + j) * g.channels;
        const Lanes value = Load<kFull>(in + t, unit.block);
        const Lanes z = value * a.scale + a.shift;
        const Lanes d_z = z > 0.0f ? Load<kFull>(gradient + t, unit.block) : kZero;
        row += d_z, row_x += d_z * value;
        Store<kFull>(d_z * a.scale, out + t, unit.block);
      }
      total += Widen(row), total_x += Widen(row_x);
    }
    sums[0] = total, sums[1] = total_x;
  }

  WorkspacePool<NoWorkspace> workspaces_;
};

// ---------------------------------------------------------------------------
// Batch norms as per-channel (scale, shift): scale = gamma / sqrt(variance +
// epsilon), shift = beta - mean * scale, for N norms at once (their weights or
// batch statistics given as lists), as the rows of (R, channels) tensors:
// output row r is norm rows[r], or the identity (1, 0) where rows[r] < 0. One
// op instead of a chain of small ones (stacks, rsqrt, products), whose
// per-op cost dominates a batch-1 call. Its gradient is written in Python.
// ---------------------------------------------------------------------------

class NormalizationOp : public OpKernel {
 public:
  explicit NormalizationOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(context, context->GetAttr("rows", &rows_));
  }

  void Compute(OpKernelContext* context) override {
    const int64_t norms = context->num_inputs() / 4;
    OP_REQUIRES(context, static_cast<int64_t>(epsilon_.size()) == norms,
                InvalidArgument("PdeKerasNormalization: ", epsilon_.size(), " epsilons for ",
                                norms, " norms"));
    const int64_t channels = context->input(0).NumElements();
    for (int i = 0; i < context->num_inputs(); ++i) {
      OP_REQUIRES(context, context->input(i).NumElements() == channels,
                  InvalidArgument("PdeKerasNormalization: input ", i, " has ",
                                  context->input(i).NumElements(), " values, expected ",
                                  channels));
    }
    for (int row : rows_) {
      OP_REQUIRES(context, row < norms,
                  InvalidArgument("PdeKerasNormalization: row ", row, " of ", norms, " norms"));
    }
    const int64_t rows = rows_.size();
    float* out[2];
    for (int i = 0; i < 2; ++i) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(i, TensorShape({rows, channels}), &output));
      out[i] = output->flat<float>().data();
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int n = rows_[r];
      for (int64_t c = 0; c < channels; ++c) {
        float scale = 1.0f, shift = 0.0f;
        if (n >= 0) {
          const float gamma = context->input(n).flat<float>()(c);
          const float beta = context->input(norms + n).flat<float>()(c);
          const float mean = context->input(2 * norms + n).flat<float>()(c);
          const float variance = context->input(3 * norms + n).flat<float>()(c);
          scale = gamma / std::sqrt(variance + epsilon_[n]);
          shift = beta - mean * scale;
        }
        out[0][r * channels + c] = scale;
        out[1][r * channels + c] = shift;
      }
    }
  }

 private:
  std::vector<float> epsilon_;
  std::vector<int> rows_;
};

// ---------------------------------------------------------------------------
// The depth-wise ops: PdeKerasDepthwiseMaps writes every map as its own
// output (the layer's BNs take them one by one, with no reshape or split of a
// fused tensor in between); PdeKerasDepthwiseMapsGrad is its gradient.
// ---------------------------------------------------------------------------

// What the depth-wise ops start from: the input (0) and kernel (1) unless
// given, checked, their geometry and data.
struct DepthwiseProblem {
  const Tensor& input;
  const Tensor& kernel;
  int64_t maps;
  Geometry g;
  const float* x;
  const float* w;
  int64_t padded_width;

  DepthwiseProblem(OpKernelContext* context, int64_t maps, int input_index = 0,
                   int kernel_index = 1)
      : input(context->input(input_index)), kernel(context->input(kernel_index)), maps(maps),
        g(input.dims() == 4 ? input.shape() : TensorShape({0, 0, 0, 0})),
        x(input.flat<float>().data()), w(kernel.flat<float>().data()),
        padded_width(g.width + 2) {
    if (input.dims() != 4) {
      context->CtxFailure(InvalidArgument("input must be rank 4 (NHWC)"));
    } else if (kernel.shape() != TensorShape({3, 3, input.dim_size(3), maps})) {
      context->CtxFailure(InvalidArgument("kernel must be shaped (3, 3, channels, maps), got ",
                                          kernel.shape().DebugString()));
    }
  }

  bool empty() const { return g.units() == 0 || g.cells == 0; }
};

// The maps also give their batch statistics (mean and biased variance per
// map and channel, as a batch normalisation in training mode uses them),
// summed as each map is written: the layer's coefficient batch norms then
// need no pass of their own over the maps.
class DepthwiseOp : public OpKernel {
 public:
  explicit DepthwiseOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const int64_t maps = context->num_outputs() - 2;
    const DepthwiseProblem problem(context, maps);
    if (!context->status().ok()) return;
    const Geometry& g = problem.g;
    std::vector<float*> outputs(maps);
    for (int64_t k = 0; k < maps; ++k) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(k, problem.input.shape(), &output));
      outputs[k] = output->flat<float>().data();
    }
    float* statistics[2];
    for (int i = 0; i < 2; ++i) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(maps + i, TensorShape({maps, g.channels}),
                                                       &output));
      statistics[i] = output->flat<float>().data();
    }
    // Per unit and map: the sum and the sum of squares.
    std::vector<Doubles> partial(g.units() * 2 * maps);
    if (g.cells == 0) return WriteStatistics(g, partial, maps, statistics[0], statistics[1]);
    ForEachUnit(context, g, g.cells * 15 * maps, workspaces_,
                [&](const Unit& unit, Workspace& workspace) {
      Doubles* moments = &partial[(g.index(unit)) * 2 * maps];
      if (unit.block == kLanes) {
        Maps<true>(g, problem, unit, workspace, outputs, moments);
      } else {
        Maps<false>(g, problem, unit, workspace, outputs, moments);
      }
    });
    WriteStatistics(g, partial, maps, statistics[0], statistics[1]);
  }

 private:
  struct Workspace {
    Plane padded;
    std::vector<Lanes> taps;
  };

  // One unit's maps, each written straight into its output, and their sums
  // and sums of squares (moments[2 k], moments[2 k + 1]).
  template <bool kFull>
  static void Maps(const Geometry& g, const DepthwiseProblem& problem, const Unit& unit,
                   Workspace& workspace, const std::vector<float*>& outputs, Doubles* moments) {
    auto& [padded, taps] = workspace;
    const int64_t maps = problem.maps, padded_width = problem.padded_width;
    const int64_t channels = g.channels, block = unit.block;
    GatherPadded(g, problem.x, unit, padded);
    GatherTaps(problem.w, g.channels, maps, unit, taps);
    for (int64_t k = 0; k < maps; ++k) {
      Lanes t[9];  // a local copy: the stores below cannot alias it
      std::copy(&taps[k * 9], &taps[k * 9] + 9, t);
      float* out = g.Base(outputs[k], unit);
      Doubles sum = {}, squares = {};
      for (int64_t i = 0; i < g.height; ++i) {
        const Lanes* row0 = &padded[i * padded_width];
        float* out_row = out + i * g.width * channels;
        Lanes row_sum = kZero, row_squares = kZero;
        for (int64_t j = 0; j < g.width; ++j) {
          const Lanes value = Convolve3x3(row0, padded_width, j, t);
          Store<kFull>(value, out_row + j * channels, block);
          row_sum += value;
          row_squares += value * value;
        }
        sum += Widen(row_sum);
        squares += Widen(row_squares);
      }
      moments[2 * k] = sum;
      moments[2 * k + 1] = squares;
    }
  }

  WorkspacePool<Workspace> workspaces_;
};

// The depth-wise conv's gradient when only the maps' batch statistics have
// one: map k's gradient is then a_k + b_k map_k (StatisticsShare), and
//   dL/dx = sum_k conv_k^T(a_k + b_k conv_k(x)),
//   dL/dkernel_k[t] = sum_p x_t(p) (a_k + b_k map_k(p)) = a_k S[t] + b_k sum_s kernel_k[s] G[t, s]
// (x_t: x shifted by tap t, zero outside; S[t] = sum_p x_t(p); G[t, s] =
// sum_p x_t(p) x_s(p)). Both without any map: dL/dx as one 5x5 conv of x
// (taps C = sum_k b_k kernel_k (*) kernel_k, plus the constant sum_k a_k
// sum kernel_k), which is exact but for the terms of the ring of cells
// just outside the image, taken off again at the edge cells; G from the
// lag products A(d) = sum_q x(q) x(q + d) (13 of them by symmetry), less
// the row and column of cells that tap t moves out of the image. Writes
// dL/dx into `grad` (height * width cells) and the kernel's gradient into
// `sums` (maps * 9).
struct StatisticsShareBackward {
  Plane wide, ring;  // x with a 2-cell zero border; one map's ring values
  // The geometry whose zeros wide and ring hold: only their interior (wide)
  // and ring cells (ring) are written per unit, so they are zeroed only
  // when it changes.
  int64_t zeroed_height = -1, zeroed_width = -1;

  void Run(int64_t height, int64_t width, const Lanes* padded_x, int64_t maps, const Lanes* taps,
           const Lanes* a, const Lanes* b, Lanes* grad, Lanes* sums) {
    const int64_t wide_width = width + 4;
    const Grid grid(height, width);
    if (height != zeroed_height || width != zeroed_width) {
      wide.assign((height + 4) * wide_width, kZero);
      ring.assign(grid.size, kZero);
      zeroed_height = height, zeroed_width = width;
    }
    for (int64_t i = 0; i < height; ++i) {
      std::copy_n(&padded_x[(i + 1) * (width + 2) + 1], width, &wide[(i + 2) * wide_width + 2]);
    }
    // x(i, j) for -2 <= i < height + 2, -2 <= j < width + 2.
    const Lanes* origin = &wide[2 * wide_width + 2];
    auto x = [origin, wide_width](int64_t i, int64_t j) -> const Lanes& {
      return origin[i * wide_width + j];
    };

    // dL/dx: the 5x5 conv over the image, the ring taken off at the edges.
    Lanes constant = kZero, c[25] = {};
    for (int64_t k = 0; k < maps; ++k) {
      const Lanes* w = &taps[k * 9];
      for (int t = 0; t < 9; ++t) {
        constant += a[k] * w[t];
        for (int s = 0; s < 9; ++s) {
          // d = s - t (rows, columns) in -2..2.
          c[(s / 3 - t / 3 + 2) * 5 + (s % 3 - t % 3 + 2)] += b[k] * w[t] * w[s];
        }
      }
    }
    for (int64_t i = 0; i < height; ++i) {
      for (int64_t j = 0; j < width; ++j) {
        Lanes rows[5];
        for (int r = 0; r < 5; ++r) {
          const Lanes* line = &x(i + r - 2, j - 2);
          rows[r] = c[r * 5] * line[0] + c[r * 5 + 1] * line[1] + c[r * 5 + 2] * line[2] +
                    c[r * 5 + 3] * line[3] + c[r * 5 + 4] * line[4];
        }
        grad[i * width + j] = constant + ((rows[0] + rows[1]) + (rows[2] + rows[3])) + rows[4];
      }
    }
    // Ring cells r (one cell outside the image) hold a_k + b_k conv_k(x)(r)
    // in the 5x5 conv; an edge cell takes their transposed-conv terms off.
    auto on_ring = [&](auto visit) {
      for (int64_t j = -1; j <= width; ++j) visit(-1, j), visit(height, j);
      for (int64_t i = 0; i < height; ++i) visit(i, -1), visit(i, width);
    };
    auto on_edge = [&](auto visit) {
      for (int64_t j = 0; j < width; ++j) {
        visit(0, j);
        if (height > 1) visit(height - 1, j);
      }
      for (int64_t i = 1; i + 1 < height; ++i) {
        visit(i, 0);
        if (width > 1) visit(i, width - 1);
      }
    };
    for (int64_t k = 0; k < maps; ++k) {
      const Lanes* w = &taps[k * 9];
      on_ring([&](int64_t i, int64_t j) {
        Lanes map = kZero;
        for (int t = 0; t < 9; ++t) map += w[t] * x(i + t / 3 - 1, j + t % 3 - 1);
        ring[grid.at(i, j)] = a[k] + b[k] * map;
      });
      on_edge([&](int64_t i, int64_t j) {
        Lanes taken = kZero;  // ring[.] is zero inside the image
        for (int t = 0; t < 9; ++t) taken += w[t] * ring[grid.at(i - t / 3 + 1, j - t % 3 + 1)];
        grad[i * width + j] -= taken;
      });
    }

    // The kernel's gradient. Lag products for d = (di, dj), di > 0 or
    // (di = 0, dj >= 0); A(-d) = A(d).
    Lanes lag[25] = {};
    for (int64_t i = 0; i < height; ++i) {
      Lanes row_lag[13] = {};
      for (int64_t j = 0; j < width; ++j) {
        const Lanes v = x(i, j);
        for (int n = 0; n < 13; ++n) {
          const int d = 12 + n;  // lags 12 .. 24: (0, 0) .. (2, 2)
          row_lag[n] += v * x(i + d / 5 - 2, j + d % 5 - 2);
        }
      }
      for (int n = 0; n < 13; ++n) lag[12 + n] += row_lag[n];
    }
    for (int n = 0; n < 12; ++n) lag[n] = lag[24 - n];
    // Sums over the first and last row and column: plain (total) and of the
    // lag products (edge[side][d]); side 0: row height - 1, 1: row 0,
    // 2: column width - 1, 3: column 0 (the cells that taps a = 0, a = 2,
    // b = 0, b = 2 move out of the image).
    Lanes total = kZero, edge_total[4] = {}, edge[4][25] = {};
    for (int64_t i = 0; i < height; ++i) {
      for (int64_t j = 0; j < width; ++j) total += x(i, j);
    }
    const int64_t edge_row[2] = {height - 1, 0}, edge_column[2] = {width - 1, 0};
    for (int side = 0; side < 2; ++side) {
      for (int64_t j = 0; j < width; ++j) {
        const Lanes v = x(edge_row[side], j);
        edge_total[side] += v;
        for (int d = 0; d < 25; ++d) edge[side][d] += v * x(edge_row[side] + d / 5 - 2, j + d % 5 - 2);
      }
      for (int64_t i = 0; i < height; ++i) {
        const Lanes v = x(i, edge_column[side]);
        edge_total[2 + side] += v;
        for (int d = 0; d < 25; ++d) {
          edge[2 + side][d] += v * x(i + d / 5 - 2, edge_column[side] + d % 5 - 2);
        }
      }
    }
    for (int t = 0; t < 9; ++t) {
      // Tap t = (ta, tb) moves row (ta = 0: last, 2: first) and column out.
      const int ta = t / 3, tb = t % 3;
      const int row_side = ta == 0 ? 0 : ta == 2 ? 1 : -1;
      const int column_side = tb == 0 ? 2 : tb == 2 ? 3 : -1;
      Lanes shifted_sum = total;
      if (row_side >= 0) shifted_sum -= edge_total[row_side];
      if (column_side >= 0) shifted_sum -= edge_total[column_side];
      const bool corner = row_side >= 0 && column_side >= 0;
      const int64_t corner_i = corner ? edge_row[row_side] : 0;
      const int64_t corner_j = corner ? edge_column[column_side - 2] : 0;
      if (corner) shifted_sum += x(corner_i, corner_j);
      Lanes gram[9];  // G[t, s]
      for (int s = 0; s < 9; ++s) {
        const int di = s / 3 - ta, dj = s % 3 - tb, d = (di + 2) * 5 + dj + 2;
        Lanes value = lag[d];
        if (row_side >= 0) value -= edge[row_side][d];
        if (column_side >= 0) value -= edge[column_side][d];
        if (corner) value += x(corner_i, corner_j) * x(corner_i + di, corner_j + dj);
        gram[s] = value;
      }
      for (int64_t k = 0; k < maps; ++k) {
        const Lanes* w = &taps[k * 9];
        Lanes through_map = kZero;
        for (int s = 0; s < 9; ++s) through_map += w[s] * gram[s];
        sums[k * 9 + t] = a[k] * shifted_sum + b[k] * through_map;
      }
    }
  }
};

// Inputs: x, kernel, the forward's means, then the gradients of the maps, of
// the means and of the variances. A map's whole gradient is its own plus the
// statistics' share, d mean / d map = 1 / N and d variance / d map =
// 2 (map - mean) / N (N values per channel), with the map recomputed here.
class DepthwiseGradOp : public OpKernel {
 public:
  explicit DepthwiseGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("count", &maps_));
  }

  void Compute(OpKernelContext* context) override {
    const int64_t maps = maps_;
    const DepthwiseProblem problem(context, maps);
    if (!context->status().ok()) return;
    const Geometry& g = problem.g;
    const int64_t padded_width = problem.padded_width;
    const TensorShape statistics_shape({maps, g.channels});
    for (int i : {2, 3 + static_cast<int>(maps), 4 + static_cast<int>(maps)}) {
      OP_REQUIRES(context, context->input(i).shape() == statistics_shape,
                  InvalidArgument("the statistics and their gradients must be shaped (maps, "
                                  "channels), got ", context->input(i).shape().DebugString()));
    }
    // With an addend (a gradient of x from elsewhere), dL/dx is written onto
    // it, in its buffer where TensorFlow allows.
    OpInputList addends;
    OP_REQUIRES_OK(context, context->input_list("addend", &addends));
    OP_REQUIRES(context, addends.size() == 0 || addends[0].shape() == problem.input.shape(),
                InvalidArgument("the addend must be shaped like the input"));
    const float* addend = addends.size() ? addends[0].flat<float>().data() : nullptr;
    Tensor* grad_input = nullptr;
    Tensor* grad_kernel = nullptr;
    if (addend) {
      OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(
                                  {static_cast<int>(context->num_inputs()) - 1}, 0,
                                  problem.input.shape(), &grad_input));
    } else {
      OP_REQUIRES_OK(context, context->allocate_output(0, problem.input.shape(), &grad_input));
    }
    OP_REQUIRES_OK(context, context->allocate_output(1, problem.kernel.shape(), &grad_kernel));
    float* dx = grad_input->flat<float>().data();
    float* dw = grad_kernel->flat<float>().data();
    std::fill_n(dw, grad_kernel->NumElements(), 0.0f);
    if (problem.empty()) return;
    // A map's gradient may be empty: zero (its share went elsewhere, see
    // Settings::depthwise), so only the statistics' share is left of it.
    std::vector<const float*> grads(maps);
    for (int64_t k = 0; k < maps; ++k) {
      const Tensor& grad = context->input(3 + k);
      OP_REQUIRES(context, grad.shape() == problem.input.shape() || grad.NumElements() == 0,
                  InvalidArgument("every map's gradient must be shaped like the input "
                                  "(or empty: zero)"));
      grads[k] = grad.NumElements() == 0 ? nullptr : grad.flat<float>().data();
    }
    const bool only_statistics =
        std::all_of(grads.begin(), grads.end(), [](const float* grad) { return !grad; });
    const float* mean = context->input(2).flat<float>().data();
    const float* grad_mean = context->input(3 + maps).flat<float>().data();
    const float* grad_variance = context->input(4 + maps).flat<float>().data();
    // Per map and channel, the statistics' share as a + b * map.
    std::vector<float> share_a, share_b;
    const bool statistics_used =
        StatisticsShare(g, maps, mean, grad_mean, grad_variance, share_a, share_b);
    // The kernel's gradient sums over the batch: one partial sum per unit,
    // added up in a fixed order afterwards (deterministic, no locks).
    std::vector<Lanes> partial(g.units() * 9 * maps, kZero);
    ForEachUnit(context, g, g.cells * 22 * maps, workspaces_,
                [&](const Unit& unit, Workspace& workspace) {
      auto& [padded_x, padded_g, grad, taps, a, b, share] = workspace;
      GatherPadded(g, problem.x, unit, padded_x);
      GatherTaps(problem.w, g.channels, maps, unit, taps);
      grad.resize(g.cells);
      Lanes* unit_partial = &partial[(g.index(unit)) * 9 * maps];
      if (statistics_used) {
        a.resize(maps), b.resize(maps);
        GatherChannels(share_a.data(), maps, g.channels, unit, a.data());
        GatherChannels(share_b.data(), maps, g.channels, unit, b.data());
      }
      if (statistics_used && only_statistics) {
        share.Run(g.height, g.width, padded_x.data(), maps, taps.data(), a.data(), b.data(),
                  grad.data(), unit_partial);
        return g.Scatter(grad, unit, dx, addend);
      }
      std::fill(grad.begin(), grad.end(), kZero);  // (share.Run above writes every cell)
      for (int64_t k = 0; k < maps; ++k) {
        if (grads[k] == nullptr && !statistics_used) continue;  // no gradient at all
        if (grads[k] != nullptr) {
          GatherPadded(g, grads[k], unit, padded_g);
        } else {
          ZeroBorder(Grid(g.height, g.width), padded_g);
        }
        const Lanes* t = &taps[k * 9];
        if (statistics_used) {
          const Lanes a_k = a[k], b_k = b[k];
          for (int64_t i = 0; i < g.height; ++i) {
            const Lanes* x0 = &padded_x[i * padded_width];
            Lanes* g_row = &padded_g[(i + 1) * padded_width + 1];
            for (int64_t j = 0; j < g.width; ++j) {
              const Lanes share = a_k + b_k * Convolve3x3(x0, padded_width, j, t);
              g_row[j] = grads[k] != nullptr ? g_row[j] + share : share;
            }
          }
        }
        DepthwiseBackward(g.height, g.width, padded_x.data(), padded_g.data(), t, grad.data(),
                          unit_partial + k * 9);
      }
      g.Scatter(grad, unit, dx, addend);
    });
    WriteKernelGradient(g, partial, maps, dw);
  }

 private:
  struct Workspace {
    Plane padded_x, padded_g, grad;
    std::vector<Lanes> taps, a, b;
    StatisticsShareBackward share;
  };
  int maps_;
  WorkspacePool<Workspace> workspaces_;
};

// PdeKerasDepthwiseStatistics(x, kernel, mean, variance) -> (x, mean,
// variance): x and the maps' batch statistics from PdeKerasDepthwiseMaps,
// passed through unchanged, as an op of their own for the gradient's sake:
// its gradient is the statistics' share of dL/dx and dL/dkernel
// (PdeKerasDepthwiseMapsGrad with empty map gradients), added in place to
// the gradient of the x it passed on. When the solver takes that x and the
// maps' own gradient through the conv (Settings::depthwise), the maps op
// gets no gradient at all (instead of tensors of zeros for its maps from
// TensorFlow's autodiff) and dL/dx needs no sum of two tensors.
class DepthwiseStatisticsOp : public OpKernel {
 public:
  explicit DepthwiseStatisticsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    OP_REQUIRES(context, context->input(3).shape() == context->input(2).shape(),
                InvalidArgument("mean and variance must have one shape"));
    for (int i : {0, 2, 3}) context->set_output(i == 0 ? 0 : i - 1, context->input(i));
  }
};

// ---------------------------------------------------------------------------
// The Global layer in inference mode as one op, PdeKerasGlobalInference:
// per unit, the depth-wise maps (kernel map maps[r] for D_x, D_y, u, v),
// computed from H^0, normalised and rectified as the solver reads them, the K
// steps and the output batch norm + ReLU, with the maps and H^K only in
// unit-local buffers: no map is written to or read back from memory, and a
// batch-1 call is one op instead of three. scale and shift are (5, channels):
// rows 0-3 normalise D_x, D_y, u, v, row 4 is the output's batch norm. Its
// gradient recomputes the three-op path (fused_solver.py).
// ---------------------------------------------------------------------------

// A unit as a problem of its own: f, H^0 and the four maps (before their
// normalisation) in unit-local buffers laid out as a one-image, one-block
// NHWC tensor (kLocal), on which Forward runs unchanged.
struct LocalProblem {
  static constexpr Unit kLocal = {0, 0, kLanes};
  Plane padded, source, initial, maps[4];
  std::vector<Lanes> taps;
  const float* inputs[6];  // f, H^0, D_x, D_y, u, v

  static Geometry Local(const Geometry& g) {
    return Geometry(TensorShape({1, g.height, g.width, kLanes}));
  }

  void Prepare(const Geometry& g, const DepthwiseProblem& problem, const Unit& unit,
               const float* source_tensor, bool shared, const std::vector<int>& map_of) {
    source.resize(g.cells), initial.resize(g.cells);
    GatherPadded(g, problem.x, unit, padded);
    GatherTaps(problem.w, g.channels, problem.maps, unit, taps);
    const int64_t padded_width = problem.padded_width;
    for (int64_t i = 0; i < g.height; ++i) {
      std::copy_n(&padded[(i + 1) * padded_width + 1], g.width, &initial[i * g.width]);
    }
    if (!shared) {
      const float* base = g.Base(source_tensor, unit);
      for (int64_t p = 0; p < g.cells; ++p) {
        source[p] = unit.block == kLanes ? Load<true>(base + p * g.channels, kLanes)
                                         : Load<false>(base + p * g.channels, unit.block);
      }
    }
    for (int r = 0; r < 4; ++r) {
      maps[r].resize(g.cells);
      const Lanes* t = &taps[map_of[r] * 9];
      for (int64_t i = 0; i < g.height; ++i) {
        for (int64_t j = 0; j < g.width; ++j) {
          maps[r][i * g.width + j] = Convolve3x3(&padded[i * padded_width], padded_width, j, t);
        }
      }
    }
    inputs[0] = Floats(shared ? initial : source);
    inputs[1] = Floats(initial);
    for (int r = 0; r < 4; ++r) inputs[2 + r] = Floats(maps[r]);
  }

  static const float* Floats(const Plane& plane) {
    return reinterpret_cast<const float*>(plane.data());
  }
  static float* Floats(Plane& plane) { return reinterpret_cast<float*>(plane.data()); }
};

class GlobalInferenceOp : public OpKernel {
 public:
  explicit GlobalInferenceOp(OpKernelConstruction* context) : OpKernel(context) {
    settings_.Init(context);
    settings_.rectify = true;
    OP_REQUIRES_OK(context, context->GetAttr("maps", &maps_));
    OP_REQUIRES(context, maps_.size() == 4,
                InvalidArgument(name(), ": maps must name 4 kernel maps"));
  }

  void Compute(OpKernelContext* context) override {
    const DepthwiseProblem problem = Check(context);
    if (!context->status().ok()) return;
    const Geometry& g = problem.g;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, problem.input.shape(), &output));
    if (problem.empty()) return;
    const float* source = context->input(0).flat<float>().data();
    const float* scale = context->input(3).flat<float>().data();
    const float* shift = context->input(4).flat<float>().data();
    float* out = output->flat<float>().data();
    const Grid grid(g.height, g.width);
    const Geometry local = LocalProblem::Local(g);
    const int64_t cost = g.cells * (35 + 15 * problem.maps + 22 * settings_.steps);
    ForEachUnit(context, g, cost, workspaces_, [&](const Unit& unit, Workspace& w) {
      w.problem.Prepare(g, problem, unit, source, settings_.shared_initial, maps_);
      w.solution.resize(g.cells);
      Affine affine[5];  // the maps' normalisations, then the output's
      GatherAffine(scale, shift, 5, g.channels, unit, affine);
      w.forward.Run<true>(local, grid, LocalProblem::kLocal, settings_, w.problem.inputs, affine,
                          LocalProblem::Floats(w.solution));
      const Affine output_norm = affine[4];
      for (Lanes& value : w.solution) value = NormalizeRectify(value, output_norm);
      g.Scatter(w.solution, unit, out);
    });
  }

 private:
  // The inputs checked: source 0, initial 1, kernel 2, scale 3 and shift 4
  // with five rows each.
  DepthwiseProblem Check(OpKernelContext* context) {
    const int64_t rows = 5;
    DepthwiseProblem problem(context, context->input(2).dims() == 4
                                          ? context->input(2).dim_size(3) : 0, 1, 2);
    if (!context->status().ok()) return problem;
    auto fail = [&](auto... message) {
      context->CtxFailure(InvalidArgument(name(), ": ", message...));
    };
    for (int map : maps_) {
      if (map < 0 || map >= problem.maps) return fail("map ", map, " of ", problem.maps), problem;
    }
    if (context->input(0).shape() != problem.input.shape()) {
      return fail("source and initial differ in shape"), problem;
    }
    for (int i : {3, 4}) {
      if (context->input(i).shape() != TensorShape({rows, problem.g.channels})) {
        return fail("input ", i, " must be shaped (", rows, ", ", problem.g.channels, ")"),
               problem;
      }
    }
    return problem;
  }

  struct Workspace {
    LocalProblem problem;
    Plane solution;
    Forward forward;
  };
  Settings settings_;
  std::vector<int> maps_;
  WorkspacePool<Workspace> workspaces_;
};

}  // namespace

#endif  // PDE_KERAS_UNIT_LANES
