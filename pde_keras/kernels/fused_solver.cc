// The fused K-step advection-diffusion solver of pde_keras, for TensorFlow on CPU.
//
// Computes exactly what pde_keras/solver.py's keras.ops solver computes (that
// solver is the reference; the stencil and the coefficient formulas below
// mirror `stencil_coefficients` and `_step_function` term by term), but one
// (image, channel block) at a time, with every intermediate tensor held in
// small per-thread buffers instead of whole tensors streamed through memory:
//
//   L H^{k+1} = M H^{k-1} - 2 (u_x + v_y) dt H^k + 2 dt f
//               + (-A_x + 2 B_x) H^k_{x+1} + (A_x + 2 B_x) H^k_{x-1}
//               + (-A_y + 2 B_y) H^k_{y+1} + (A_y + 2 B_y) H^k_{y-1}
//
// written per cell as H^{k+1} = a H^{k-1} + s f + b H^k + sum_n c_n S_n(H^k),
// with the seven coefficient maps (a, b, c_n, s) computed once per call from
// D_x, D_y, u, v.
//
// PdeKerasSolve(source f, initial H^0, D_x, D_y, u, v) -> H^K.
// PdeKerasSolveGrad(same inputs, dL/dH^K) -> dL/d(f, H^0, D_x, D_y, u, v):
// recomputes the K states, runs the adjoint recurrence backwards
//   G^k += b G^{k+1} + sum_n S_n^T(c_n G^{k+1}),   G^{k-1} += a G^{k+1},
// accumulates the coefficient maps' gradients (dc_n += G^{k+1} S_n(H^k), ...)
// and chains them to D_x, D_y, u, v (u_x, v_y through the transposed
// central differences).
//
// All inputs are float32 NHWC tensors of one shape (the Python wrapper
// broadcasts scalar and per-channel coefficients). x is the height axis,
// y the width axis. Work is split over (image, block of channels) units on
// TensorFlow's intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace pde_keras {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

// Channels per work unit: wide enough for the channel loops to vectorise,
// narrow enough that a batch-1 call still splits across the threads.
constexpr int64_t kChannelBlock = 8;
// Ghost cell of value zero (dirichlet): a neighbour index of -1.
constexpr int64_t kZeroGhost = -1;

enum class Boundary { kPeriodic, kNeumann, kDirichlet };

// Index of the cell `index + offset` along an axis of `size` cells, or
// kZeroGhost: the ghost-cell rule of solver.neighbours.
int64_t NeighbourIndex(int64_t index, int64_t offset, int64_t size, Boundary boundary) {
  const int64_t target = index + offset;
  if (target >= 0 && target < size) return target;
  switch (boundary) {
    case Boundary::kPeriodic: return (target + size) % size;
    case Boundary::kNeumann: return target < 0 ? 0 : size - 1;
    case Boundary::kDirichlet: return kZeroGhost;
  }
  return kZeroGhost;
}

struct Settings {
  int steps;
  Boundary boundary;
  // The scheme's constants, computed in double as the Python reference does
  // with Python floats, then rounded once.
  float half_over_dx, half_over_dy;   // central differences
  float dt_over_dx, dt_over_dy;       // A_x = u dt/dx, A_y = v dt/dy
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

// The four neighbours of every cell of one (height x width) plane, as cell
// indices (or kZeroGhost).
struct Neighbours {
  std::vector<int64_t> x_next, x_previous, y_next, y_previous;

  Neighbours(int64_t height, int64_t width, Boundary boundary) {
    const int64_t cells = height * width;
    x_next.resize(cells), x_previous.resize(cells), y_next.resize(cells), y_previous.resize(cells);
    for (int64_t i = 0; i < height; ++i) {
      for (int64_t j = 0; j < width; ++j) {
        const int64_t p = i * width + j;
        const int64_t xn = NeighbourIndex(i, 1, height, boundary);
        const int64_t xp = NeighbourIndex(i, -1, height, boundary);
        const int64_t yn = NeighbourIndex(j, 1, width, boundary);
        const int64_t yp = NeighbourIndex(j, -1, width, boundary);
        x_next[p] = xn == kZeroGhost ? kZeroGhost : xn * width + j;
        x_previous[p] = xp == kZeroGhost ? kZeroGhost : xp * width + j;
        y_next[p] = yn == kZeroGhost ? kZeroGhost : i * width + yn;
        y_previous[p] = yp == kZeroGhost ? kZeroGhost : i * width + yp;
      }
    }
  }
};

// One (image, channel block) unit: `block` channels starting at `channel`
// of image `image`. Local planes are [cells][block], contiguous.
struct Unit {
  int64_t image, channel, block;
};

// Problem geometry and the unit <-> tensor mapping.
struct Geometry {
  int64_t batch, height, width, channels, cells, blocks;

  explicit Geometry(const TensorShape& shape)
      : batch(shape.dim_size(0)), height(shape.dim_size(1)), width(shape.dim_size(2)),
        channels(shape.dim_size(3)), cells(shape.dim_size(1) * shape.dim_size(2)),
        blocks((shape.dim_size(3) + kChannelBlock - 1) / kChannelBlock) {}

  int64_t units() const { return batch * blocks; }

  Unit unit(int64_t index) const {
    const int64_t channel = (index % blocks) * kChannelBlock;
    return {index / blocks, channel, std::min(kChannelBlock, channels - channel)};
  }

  // Copies the unit's channels of an NHWC tensor into a local plane.
  void Gather(const float* tensor, const Unit& unit, float* local) const {
    const float* base = tensor + unit.image * cells * channels + unit.channel;
    for (int64_t p = 0; p < cells; ++p) {
      std::copy(base + p * channels, base + p * channels + unit.block, local + p * unit.block);
    }
  }

  void Scatter(const float* local, const Unit& unit, float* tensor) const {
    float* base = tensor + unit.image * cells * channels + unit.channel;
    for (int64_t p = 0; p < cells; ++p) {
      std::copy(local + p * unit.block, local + (p + 1) * unit.block, base + p * channels);
    }
  }
};

// Pointer to neighbour cell `index` of a local plane, or to zeros.
inline const float* At(const float* plane, int64_t index, int64_t block, const float* zeros) {
  return index == kZeroGhost ? zeros : plane + index * block;
}

// The seven coefficient maps of one unit, divided through by L, plus 1/L.
struct Coefficients {
  std::vector<float> previous, centre, x_next, x_previous, y_next, y_previous, source, inv_l;

  void Resize(int64_t size) {
    for (auto* map : {&previous, &centre, &x_next, &x_previous, &y_next, &y_previous, &source,
                      &inv_l}) {
      map->resize(size);
    }
  }

  // From local planes of D_x, D_y, u, v (solver.stencil_coefficients).
  void Compute(const float* d_x, const float* d_y, const float* u, const float* v,
               const Neighbours& nb, int64_t cells, int64_t block, const float* zeros,
               const Settings& s) {
    for (int64_t p = 0; p < cells; ++p) {
      const float* u_next = At(u, nb.x_next[p], block, zeros);
      const float* u_prev = At(u, nb.x_previous[p], block, zeros);
      const float* v_next = At(v, nb.y_next[p], block, zeros);
      const float* v_prev = At(v, nb.y_previous[p], block, zeros);
      const int64_t o = p * block;
      for (int64_t l = 0; l < block; ++l) {
        const float ux = (u_next[l] - u_prev[l]) * s.half_over_dx;
        const float vy = (v_next[l] - v_prev[l]) * s.half_over_dy;
        const float a_x = u[o + l] * s.dt_over_dx, a_y = v[o + l] * s.dt_over_dy;
        const float two_b_x = d_x[o + l] * s.two_dt_over_dx2;
        const float two_b_y = d_y[o + l] * s.two_dt_over_dy2;
        const float inv = 1.0f / (1.0f + two_b_x + two_b_y);
        inv_l[o + l] = inv;
        previous[o + l] = (1.0f - two_b_x - two_b_y) * inv;
        centre[o + l] = (ux + vy) * s.minus_two_dt * inv;
        x_next[o + l] = (two_b_x - a_x) * inv;
        x_previous[o + l] = (two_b_x + a_x) * inv;
        y_next[o + l] = (two_b_y - a_y) * inv;
        y_previous[o + l] = (two_b_y + a_y) * inv;
        source[o + l] = s.two_dt * inv;
      }
    }
  }
};

// One step: next = a previous + driven + b current + sum_n c_n S_n(current).
void Step(const Coefficients& c, const float* driven, const float* previous,
          const float* current, const Neighbours& nb, int64_t cells, int64_t block,
          const float* zeros, float* next) {
  for (int64_t p = 0; p < cells; ++p) {
    const float* xn = At(current, nb.x_next[p], block, zeros);
    const float* xp = At(current, nb.x_previous[p], block, zeros);
    const float* yn = At(current, nb.y_next[p], block, zeros);
    const float* yp = At(current, nb.y_previous[p], block, zeros);
    const int64_t o = p * block;
    for (int64_t l = 0; l < block; ++l) {
      next[o + l] = c.previous[o + l] * previous[o + l] + driven[o + l] +
                    c.centre[o + l] * current[o + l] + c.x_next[o + l] * xn[l] +
                    c.x_previous[o + l] * xp[l] + c.y_next[o + l] * yn[l] +
                    c.y_previous[o + l] * yp[l];
    }
  }
}

// Buffers and results of one unit's forward pass.
struct UnitState {
  std::vector<float> f, d_x, d_y, u, v, driven, zeros;
  // states[k + 1] = H^k for k = -1 .. (the last state kept).
  std::vector<std::vector<float>> states;
  Coefficients c;

  // Loads the unit, computes the maps and runs the K steps. Keeps every
  // state when `keep_all` (the gradient needs H^{-1} .. H^{K-1}); returns H^K.
  const float* Run(const Geometry& g, const Unit& unit, const Neighbours& nb,
                   const Settings& s, const float* const inputs[6], bool keep_all) {
    const int64_t size = g.cells * unit.block;
    for (auto* plane : {&f, &d_x, &d_y, &u, &v, &driven}) plane->resize(size);
    zeros.assign(unit.block, 0.0f);
    g.Gather(inputs[0], unit, f.data());
    g.Gather(inputs[2], unit, d_x.data());
    g.Gather(inputs[3], unit, d_y.data());
    g.Gather(inputs[4], unit, u.data());
    g.Gather(inputs[5], unit, v.data());
    c.Resize(size);
    c.Compute(d_x.data(), d_y.data(), u.data(), v.data(), nb, g.cells, unit.block,
              zeros.data(), s);
    for (int64_t i = 0; i < size; ++i) driven[i] = c.source[i] * f[i];
    // Forward: three rotating states; gradient: all K + 2.
    const size_t count = keep_all ? s.steps + 2 : 3;
    states.resize(count);
    for (auto& state : states) state.resize(size);
    std::copy(f.begin(), f.end(), states[0].begin());
    g.Gather(inputs[1], unit, states[1].data());
    for (int k = 0; k < s.steps; ++k) {
      const size_t prev = keep_all ? k : k % 3, cur = keep_all ? k + 1 : (k + 1) % 3,
                   next = keep_all ? k + 2 : (k + 2) % 3;
      Step(c, driven.data(), states[prev].data(), states[cur].data(), nb, g.cells, unit.block,
           zeros.data(), states[next].data());
    }
    return states[keep_all ? s.steps + 1 : (s.steps + 1) % 3].data();
  }
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
  return Geometry(shape);
}

// Runs `work(unit)` for every unit on TensorFlow's CPU thread pool.
template <typename Work>
void ForEachUnit(OpKernelContext* context, const Geometry& g, int64_t cost_per_unit,
                 Work work) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(g.units(), cost_per_unit, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) work(g.unit(i));
  });
}

class SolveOp : public OpKernel {
 public:
  explicit SolveOp(OpKernelConstruction* context) : OpKernel(context) { settings_.Init(context); }

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckInputs(context, 6);
    if (!context->status().ok()) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(0).shape(), &output));
    if (g.units() == 0 || g.cells == 0) return;
    const float* inputs[6];
    for (int i = 0; i < 6; ++i) inputs[i] = context->input(i).flat<float>().data();
    float* out = output->flat<float>().data();
    const Neighbours nb(g.height, g.width, settings_.boundary);
    const int64_t cost = g.cells * kChannelBlock * (30 + 15 * settings_.steps);
    ForEachUnit(context, g, cost, [&](const Unit& unit) {
      thread_local UnitState state;
      g.Scatter(state.Run(g, unit, nb, settings_, inputs, false), unit, out);
    });
  }

 private:
  Settings settings_;
};

class SolveGradOp : public OpKernel {
 public:
  explicit SolveGradOp(OpKernelConstruction* context) : OpKernel(context) {
    settings_.Init(context);
  }

  void Compute(OpKernelContext* context) override {
    const Geometry g = CheckInputs(context, 7);
    if (!context->status().ok()) return;
    float* outputs[6];
    for (int i = 0; i < 6; ++i) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(i, context->input(0).shape(), &output));
      outputs[i] = output->flat<float>().data();
    }
    if (g.units() == 0 || g.cells == 0) return;
    const float* inputs[6];
    for (int i = 0; i < 6; ++i) inputs[i] = context->input(i).flat<float>().data();
    const float* grad_solution = context->input(6).flat<float>().data();
    const Neighbours nb(g.height, g.width, settings_.boundary);
    const int64_t cost = g.cells * kChannelBlock * (80 + 45 * settings_.steps);
    ForEachUnit(context, g, cost, [&](const Unit& unit) {
      thread_local UnitState state;
      thread_local Backward backward;
      state.Run(g, unit, nb, settings_, inputs, true);
      backward.Run(g, unit, nb, settings_, state, grad_solution, outputs);
    });
  }

 private:
  // The adjoint pass of one unit.
  struct Backward {
    // Adjoint states G^{k+1}, G^k, G^{k-1} (rotating) and the gradients of
    // the seven coefficient maps, then of D_x, D_y, u, v and f.
    std::vector<float> g_next, g_current, g_previous;
    std::vector<float> d_previous, d_centre, d_x_next, d_x_previous, d_y_next, d_y_previous,
        d_source, d_f, d_dx, d_dy, d_u, d_v;

    void Run(const Geometry& geometry, const Unit& unit, const Neighbours& nb,
             const Settings& s, const UnitState& st, const float* grad_solution,
             float* const outputs[6]) {
      const int64_t cells = geometry.cells, block = unit.block, size = cells * block;
      for (auto* plane : {&g_next, &g_current, &g_previous, &d_previous, &d_centre, &d_x_next,
                          &d_x_previous, &d_y_next, &d_y_previous, &d_source, &d_f}) {
        plane->assign(size, 0.0f);
      }
      const Coefficients& c = st.c;
      const float* f = st.f.data();
      geometry.Gather(grad_solution, unit, g_next.data());
      for (int k = s.steps - 1; k >= 0; --k) {
        // g_next = G^{k+1} is complete; H^{k-1} = states[k], H^k = states[k + 1].
        const float* h_previous = st.states[k].data();
        const float* h = st.states[k + 1].data();
        for (int64_t p = 0; p < cells; ++p) {
          const int64_t xn = nb.x_next[p], xp = nb.x_previous[p];
          const int64_t yn = nb.y_next[p], yp = nb.y_previous[p];
          const float* zeros = st.zeros.data();
          const float* h_xn = At(h, xn, block, zeros);
          const float* h_xp = At(h, xp, block, zeros);
          const float* h_yn = At(h, yn, block, zeros);
          const float* h_yp = At(h, yp, block, zeros);
          const int64_t o = p * block;
          for (int64_t l = 0; l < block; ++l) {
            const float gl = g_next[o + l];
            d_previous[o + l] += gl * h_previous[o + l];
            d_centre[o + l] += gl * h[o + l];
            d_x_next[o + l] += gl * h_xn[l];
            d_x_previous[o + l] += gl * h_xp[l];
            d_y_next[o + l] += gl * h_yn[l];
            d_y_previous[o + l] += gl * h_yp[l];
            d_source[o + l] += gl * f[o + l];
            d_f[o + l] += gl * c.source[o + l];  // f drives every step
            g_current[o + l] += c.centre[o + l] * gl;
            g_previous[o + l] = c.previous[o + l] * gl;
          }
          // S_n^T: each cell's neighbour term flows back to that neighbour.
          if (xn != kZeroGhost) {
            float* target = g_current.data() + xn * block;
            for (int64_t l = 0; l < block; ++l) target[l] += c.x_next[o + l] * g_next[o + l];
          }
          if (xp != kZeroGhost) {
            float* target = g_current.data() + xp * block;
            for (int64_t l = 0; l < block; ++l) target[l] += c.x_previous[o + l] * g_next[o + l];
          }
          if (yn != kZeroGhost) {
            float* target = g_current.data() + yn * block;
            for (int64_t l = 0; l < block; ++l) target[l] += c.y_next[o + l] * g_next[o + l];
          }
          if (yp != kZeroGhost) {
            float* target = g_current.data() + yp * block;
            for (int64_t l = 0; l < block; ++l) target[l] += c.y_previous[o + l] * g_next[o + l];
          }
        }
        // Rotate: G^k is complete; G^{k-1} holds a G^{k+1} so far.
        std::swap(g_next, g_current);
        std::swap(g_current, g_previous);
        std::fill(g_previous.begin(), g_previous.end(), 0.0f);
      }
      // Now g_next = G^0 = dL/dH^0, g_current = G^{-1} (H^{-1} is f).
      geometry.Scatter(g_next.data(), unit, outputs[1]);
      for (int64_t i = 0; i < size; ++i) d_f[i] += g_current[i];
      geometry.Scatter(d_f.data(), unit, outputs[0]);
      ChainToInputs(geometry, unit, nb, s, c, outputs);
    }

    void ChainToInputs(const Geometry& geometry, const Unit& unit, const Neighbours& nb,
                       const Settings& s, const Coefficients& c, float* const outputs[6]) {
      const int64_t cells = geometry.cells, block = unit.block, size = cells * block;
      for (auto* plane : {&d_dx, &d_dy, &d_u, &d_v}) plane->assign(size, 0.0f);
      for (int64_t p = 0; p < cells; ++p) {
        const int64_t o = p * block;
        const int64_t xn = nb.x_next[p], xp = nb.x_previous[p];
        const int64_t yn = nb.y_next[p], yp = nb.y_previous[p];
        for (int64_t l = 0; l < block; ++l) {
          const int64_t i = o + l;
          const float inv = c.inv_l[i];
          // Every map is (numerator) / L: d map / d(2B) = (d numerator / d(2B) - map) / L.
          const float through_l =
              -(d_previous[i] * c.previous[i] + d_centre[i] * c.centre[i] +
                d_x_next[i] * c.x_next[i] + d_x_previous[i] * c.x_previous[i] +
                d_y_next[i] * c.y_next[i] + d_y_previous[i] * c.y_previous[i] +
                d_source[i] * c.source[i]) * inv;
          const float d_two_b_x = through_l + (d_x_next[i] + d_x_previous[i] - d_previous[i]) * inv;
          const float d_two_b_y = through_l + (d_y_next[i] + d_y_previous[i] - d_previous[i]) * inv;
          d_dx[i] = d_two_b_x * s.two_dt_over_dx2;
          d_dy[i] = d_two_b_y * s.two_dt_over_dy2;
          d_u[i] += (d_x_previous[i] - d_x_next[i]) * inv * s.dt_over_dx;
          d_v[i] += (d_y_previous[i] - d_y_next[i]) * inv * s.dt_over_dy;
          // centre = (u_x + v_y) (-2 dt) / L; u_x = (u[x+1] - u[x-1]) / (2 dx).
          const float d_divergence = d_centre[i] * s.minus_two_dt * inv;
          if (xn != kZeroGhost) d_u[xn * block + l] += d_divergence * s.half_over_dx;
          if (xp != kZeroGhost) d_u[xp * block + l] -= d_divergence * s.half_over_dx;
          if (yn != kZeroGhost) d_v[yn * block + l] += d_divergence * s.half_over_dy;
          if (yp != kZeroGhost) d_v[yp * block + l] -= d_divergence * s.half_over_dy;
        }
      }
      geometry.Scatter(d_dx.data(), unit, outputs[2]);
      geometry.Scatter(d_dy.data(), unit, outputs[3]);
      geometry.Scatter(d_u.data(), unit, outputs[4]);
      geometry.Scatter(d_v.data(), unit, outputs[5]);
    }
  };

  Settings settings_;
};

}  // namespace

REGISTER_OP("PdeKerasSolve")
    .Input("source: float")
    .Input("initial: float")
    .Input("diffusivity_x: float")
    .Input("diffusivity_y: float")
    .Input("velocity_x: float")
    .Input("velocity_y: float")
    .Output("solution: float")
    .Attr("steps: int >= 1")
    .Attr("dt: float")
    .Attr("dx: float")
    .Attr("dy: float")
    .Attr("boundary: {'periodic', 'neumann', 'dirichlet'}")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("PdeKerasSolveGrad")
    .Input("source: float")
    .Input("initial: float")
    .Input("diffusivity_x: float")
    .Input("diffusivity_y: float")
    .Input("velocity_x: float")
    .Input("velocity_y: float")
    .Input("grad_solution: float")
    .Output("grad_source: float")
    .Output("grad_initial: float")
    .Output("grad_diffusivity_x: float")
    .Output("grad_diffusivity_y: float")
    .Output("grad_velocity_x: float")
    .Output("grad_velocity_y: float")
    .Attr("steps: int >= 1")
    .Attr("dt: float")
    .Attr("dx: float")
    .Attr("dy: float")
    .Attr("boundary: {'periodic', 'neumann', 'dirichlet'}")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < 6; ++i) c->set_output(i, c->input(0));
      return ::tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("PdeKerasSolve").Device(::tensorflow::DEVICE_CPU), SolveOp);
REGISTER_KERNEL_BUILDER(Name("PdeKerasSolveGrad").Device(::tensorflow::DEVICE_CPU), SolveGradOp);

}  // namespace pde_keras
