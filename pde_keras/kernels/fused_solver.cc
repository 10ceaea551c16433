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
// PdeKerasDepthwiseMaps(x, kernel (3, 3, C, m)) -> m maps: the Global layer's
// depth-wise 3x3 coefficient conv ("same"), one output per map, and its
// gradient op PdeKerasDepthwiseMapsGrad.
//
// All solver inputs are float32 NHWC tensors of one shape (the Python wrapper
// broadcasts scalar and per-channel coefficients). x is the height axis,
// y the width axis. Work is split over (image, block of channels) units on
// TensorFlow's intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Channels per work unit: one GCC vector of kLanes floats per cell, so every
// channel loop is a vector operation (AVX: one instruction, SSE: two); few
// enough that a batch-1 call still splits across threads. A last block of
// fewer channels is zero-padded.
constexpr int64_t kLanes = 8;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
// A plane: one Lanes per cell of an (image, channel block), row-major.
using Plane = std::vector<Lanes>;
// Ghost cell of value zero (dirichlet): a neighbour index of -1.
constexpr int64_t kZeroGhost = -1;
const Lanes kZero = {};

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
  bool rectify;  // D_x, D_y, u, v are given before their ReLU
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
    OP_REQUIRES_OK(context, context->GetAttr("rectify", &rectify));
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
// indices, or kZeroGhost.
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

// Neighbour `index` of a plane, or the zero ghost.
inline const Lanes& At(const Lanes* plane, int64_t index) {
  return index == kZeroGhost ? kZero : plane[index];
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

  Unit unit(int64_t index) const {
    const int64_t channel = (index % blocks) * kLanes;
    return {index / blocks, channel, std::min(kLanes, channels - channel)};
  }

  // Copies the unit's channels of an NHWC tensor into a plane.
  void Gather(const float* tensor, const Unit& unit, Plane& plane) const {
    plane.resize(cells);
    const float* base = tensor + unit.image * cells * channels + unit.channel;
    if (unit.block == kLanes) {  // a fixed-size copy compiles to one vector load
      for (int64_t p = 0; p < cells; ++p) std::memcpy(&plane[p], base + p * channels, sizeof(Lanes));
      return;
    }
    std::fill(plane.begin(), plane.end(), kZero);
    for (int64_t p = 0; p < cells; ++p) {
      std::memcpy(&plane[p], base + p * channels, unit.block * sizeof(float));
    }
  }

  void Scatter(const Plane& plane, const Unit& unit, float* tensor) const {
    float* base = tensor + unit.image * cells * channels + unit.channel;
    if (unit.block == kLanes) {
      for (int64_t p = 0; p < cells; ++p) std::memcpy(base + p * channels, &plane[p], sizeof(Lanes));
      return;
    }
    for (int64_t p = 0; p < cells; ++p) {
      std::memcpy(base + p * channels, &plane[p], unit.block * sizeof(float));
    }
  }
};

// The seven coefficient maps of one unit, divided through by L, plus 1/L.
struct Coefficients {
  Plane previous, centre, x_next, x_previous, y_next, y_previous, source, inv_l;

  // From planes of D_x, D_y, u, v (solver.stencil_coefficients).
  void Compute(const Plane& d_x, const Plane& d_y, const Plane& u, const Plane& v,
               const Neighbours& nb, const Settings& s) {
    const int64_t cells = u.size();
    for (auto* map : {&previous, &centre, &x_next, &x_previous, &y_next, &y_previous, &source,
                      &inv_l}) {
      map->resize(cells);
    }
    for (int64_t p = 0; p < cells; ++p) {
      const Lanes ux = (At(u.data(), nb.x_next[p]) - At(u.data(), nb.x_previous[p])) *
                       s.half_over_dx;
      const Lanes vy = (At(v.data(), nb.y_next[p]) - At(v.data(), nb.y_previous[p])) *
                       s.half_over_dy;
      const Lanes a_x = u[p] * s.dt_over_dx, a_y = v[p] * s.dt_over_dy;
      const Lanes two_b_x = d_x[p] * s.two_dt_over_dx2;
      const Lanes two_b_y = d_y[p] * s.two_dt_over_dy2;
      const Lanes inv = 1.0f / (1.0f + two_b_x + two_b_y);
      inv_l[p] = inv;
      previous[p] = (1.0f - two_b_x - two_b_y) * inv;
      centre[p] = (ux + vy) * s.minus_two_dt * inv;
      x_next[p] = (two_b_x - a_x) * inv;
      x_previous[p] = (two_b_x + a_x) * inv;
      y_next[p] = (two_b_y - a_y) * inv;
      y_previous[p] = (two_b_y + a_y) * inv;
      source[p] = s.two_dt * inv;
    }
  }
};

// One step: next = a previous + driven + b current + sum_n c_n S_n(current).
void Step(const Coefficients& c, const Plane& driven, const Plane& previous,
          const Plane& current, const Neighbours& nb, Plane& next) {
  const Lanes* h = current.data();
  for (size_t p = 0; p < current.size(); ++p) {
    next[p] = c.previous[p] * previous[p] + driven[p] + c.centre[p] * h[p] +
              c.x_next[p] * At(h, nb.x_next[p]) + c.x_previous[p] * At(h, nb.x_previous[p]) +
              c.y_next[p] * At(h, nb.y_next[p]) + c.y_previous[p] * At(h, nb.y_previous[p]);
  }
}

// Planes and results of one unit's forward pass.
struct Forward {
  Plane f, d_x, d_y, u, v, driven;
  // states[k + 1] = H^k for k = -1 .. (the last state kept).
  std::vector<Plane> states;
  Coefficients c;

  // Loads the unit, computes the maps and runs the K steps. Keeps every
  // state when `keep_all` (the gradient needs H^{-1} .. H^{K-1}); returns H^K.
  const Plane& Run(const Geometry& g, const Unit& unit, const Neighbours& nb,
                   const Settings& s, const float* const inputs[6], bool keep_all) {
    g.Gather(inputs[0], unit, f);
    g.Gather(inputs[2], unit, d_x);
    g.Gather(inputs[3], unit, d_y);
    g.Gather(inputs[4], unit, u);
    g.Gather(inputs[5], unit, v);
    if (s.rectify) {
      // ReLU in place: the gradient's mask is then (map > 0), as pre > 0 exactly when ReLU(pre) > 0.
      for (Plane* plane : {&d_x, &d_y, &u, &v}) {
        for (Lanes& value : *plane) value = value > 0.0f ? value : kZero;
      }
    }
    c.Compute(d_x, d_y, u, v, nb, s);
    driven.resize(g.cells);
    for (int64_t p = 0; p < g.cells; ++p) driven[p] = c.source[p] * f[p];
    // Forward: three rotating states; gradient: all K + 2.
    const size_t count = keep_all ? s.steps + 2 : 3;
    if (states.size() < count) states.resize(count);
    for (size_t i = 0; i < count; ++i) states[i].resize(g.cells);
    states[0] = f;
    g.Gather(inputs[1], unit, states[1]);
    for (int k = 0; k < s.steps; ++k) {
      const size_t prev = keep_all ? k : k % 3, cur = keep_all ? k + 1 : (k + 1) % 3,
                   next = keep_all ? k + 2 : (k + 2) % 3;
      Step(c, driven, states[prev], states[cur], nb, states[next]);
    }
    return states[keep_all ? s.steps + 1 : (s.steps + 1) % 3];
  }
};

// The adjoint pass of one unit.
struct Backward {
  // Adjoint states G^{k+1}, G^k, G^{k-1} (rotating) and the gradients of
  // the seven coefficient maps, then of f, D_x, D_y, u, v.
  Plane g_next, g_current, g_previous;
  Plane d_previous, d_centre, d_x_next, d_x_previous, d_y_next, d_y_previous, d_source, d_f,
      d_dx, d_dy, d_u, d_v;

  // One step k backwards: g_next = G^{k+1} (complete) flows into the maps'
  // gradients, G^k (g_current) and G^{k-1} (g_previous, overwritten).
  void Step(const Coefficients& c, const Plane& f, const Plane& h_previous,
            const Plane& current, const Neighbours& nb) {
    const Lanes* h = current.data();
    Lanes* g_k = g_current.data();
    for (size_t p = 0; p < current.size(); ++p) {
      const int64_t xn = nb.x_next[p], xp = nb.x_previous[p];
      const int64_t yn = nb.y_next[p], yp = nb.y_previous[p];
      const Lanes g = g_next[p];
      d_previous[p] += g * h_previous[p];
      d_centre[p] += g * h[p];
      d_x_next[p] += g * At(h, xn);
      d_x_previous[p] += g * At(h, xp);
      d_y_next[p] += g * At(h, yn);
      d_y_previous[p] += g * At(h, yp);
      d_source[p] += g * f[p];
      d_f[p] += g * c.source[p];  // f drives every step
      g_k[p] += c.centre[p] * g;
      g_previous[p] = c.previous[p] * g;
      // S_n^T: each cell's neighbour term flows back to that neighbour.
      if (xn != kZeroGhost) g_k[xn] += c.x_next[p] * g;
      if (xp != kZeroGhost) g_k[xp] += c.x_previous[p] * g;
      if (yn != kZeroGhost) g_k[yn] += c.y_next[p] * g;
      if (yp != kZeroGhost) g_k[yp] += c.y_previous[p] * g;
    }
  }

  void Run(const Geometry& geometry, const Unit& unit, const Neighbours& nb, const Settings& s,
           const Forward& forward, const float* grad_solution, float* const outputs[6]) {
    for (auto* plane : {&g_current, &g_previous, &d_previous, &d_centre, &d_x_next,
                        &d_x_previous, &d_y_next, &d_y_previous, &d_source, &d_f}) {
      plane->assign(geometry.cells, kZero);
    }
    geometry.Gather(grad_solution, unit, g_next);
    for (int k = s.steps - 1; k >= 0; --k) {
      // H^{k-1} = states[k], H^k = states[k + 1].
      Step(forward.c, forward.f, forward.states[k], forward.states[k + 1], nb);
      // Rotate: G^k is complete; G^{k-1} holds a G^{k+1} so far.
      std::swap(g_next, g_current);
      std::swap(g_current, g_previous);
    }
    // Now g_next = G^0 = dL/dH^0 and g_current = G^{-1} (H^{-1} is f).
    geometry.Scatter(g_next, unit, outputs[1]);
    for (int64_t p = 0; p < geometry.cells; ++p) d_f[p] += g_current[p];
    geometry.Scatter(d_f, unit, outputs[0]);
    ChainToInputs(geometry, unit, nb, s, forward, outputs);
  }

  // From the seven maps' gradients to those of D_x, D_y, u, v.
  void ChainToInputs(const Geometry& geometry, const Unit& unit, const Neighbours& nb,
                     const Settings& s, const Forward& forward, float* const outputs[6]) {
    const Coefficients& c = forward.c;
    for (auto* plane : {&d_u, &d_v}) plane->assign(geometry.cells, kZero);
    d_dx.resize(geometry.cells), d_dy.resize(geometry.cells);
    for (int64_t p = 0; p < geometry.cells; ++p) {
      const Lanes inv = c.inv_l[p];
      // Every map is (numerator) / L: d map / d(2B) = (d numerator / d(2B) - map) / L.
      const Lanes through_l =
          -(d_previous[p] * c.previous[p] + d_centre[p] * c.centre[p] +
            d_x_next[p] * c.x_next[p] + d_x_previous[p] * c.x_previous[p] +
            d_y_next[p] * c.y_next[p] + d_y_previous[p] * c.y_previous[p] +
            d_source[p] * c.source[p]) * inv;
      d_dx[p] = (through_l + (d_x_next[p] + d_x_previous[p] - d_previous[p]) * inv) *
                s.two_dt_over_dx2;
      d_dy[p] = (through_l + (d_y_next[p] + d_y_previous[p] - d_previous[p]) * inv) *
                s.two_dt_over_dy2;
      d_u[p] += (d_x_previous[p] - d_x_next[p]) * inv * s.dt_over_dx;
      d_v[p] += (d_y_previous[p] - d_y_next[p]) * inv * s.dt_over_dy;
      // centre = (u_x + v_y) (-2 dt) / L, u_x = (u[x+1] - u[x-1]) / (2 dx):
      // the transposed central differences.
      const Lanes divergence = d_centre[p] * s.minus_two_dt * inv;
      const int64_t xn = nb.x_next[p], xp = nb.x_previous[p];
      const int64_t yn = nb.y_next[p], yp = nb.y_previous[p];
      if (xn != kZeroGhost) d_u[xn] += divergence * s.half_over_dx;
      if (xp != kZeroGhost) d_u[xp] -= divergence * s.half_over_dx;
      if (yn != kZeroGhost) d_v[yn] += divergence * s.half_over_dy;
      if (yp != kZeroGhost) d_v[yp] -= divergence * s.half_over_dy;
    }
    if (s.rectify) {  // through the ReLUs: zero where the map was clamped
      const Plane* maps[] = {&forward.d_x, &forward.d_y, &forward.u, &forward.v};
      Plane* grads[] = {&d_dx, &d_dy, &d_u, &d_v};
      for (int m = 0; m < 4; ++m) {
        for (int64_t p = 0; p < geometry.cells; ++p) {
          (*grads[m])[p] = (*maps[m])[p] > 0.0f ? (*grads[m])[p] : kZero;
        }
      }
    }
    geometry.Scatter(d_dx, unit, outputs[2]);
    geometry.Scatter(d_dy, unit, outputs[3]);
    geometry.Scatter(d_u, unit, outputs[4]);
    geometry.Scatter(d_v, unit, outputs[5]);
  }
};

struct ForwardAndBackward {
  Forward forward;
  Backward backward;
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

// Runs `work(unit, workspace)` for every unit on TensorFlow's CPU thread
// pool; each shard (a range of units on one thread) has its own Workspace,
// whose buffers the shard's units reuse.
template <typename Workspace, typename Work>
void ForEachUnit(OpKernelContext* context, const Geometry& g, int64_t cost_per_unit,
                 Work work) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(g.units(), cost_per_unit, [&](int64_t begin, int64_t end) {
    Workspace workspace;
    for (int64_t i = begin; i < end; ++i) work(g.unit(i), workspace);
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
    const int64_t cost = g.cells * kLanes * (30 + 15 * settings_.steps);
    ForEachUnit<Forward>(context, g, cost, [&](const Unit& unit, Forward& forward) {
      g.Scatter(forward.Run(g, unit, nb, settings_, inputs, false), unit, out);
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
    const int64_t cost = g.cells * kLanes * (80 + 45 * settings_.steps);
    ForEachUnit<ForwardAndBackward>(context, g, cost,
                                    [&](const Unit& unit, ForwardAndBackward& work) {
      work.forward.Run(g, unit, nb, settings_, inputs, true);
      work.backward.Run(g, unit, nb, settings_, work.forward, grad_solution, outputs);
    });
  }

 private:
  Settings settings_;
};


// ---------------------------------------------------------------------------
// The coefficient maps' depth-wise 3x3 convolution ("same", zero padding):
// map_k[n, i, j, c] = sum_{a, b} x[n, i + a - 1, j + b - 1, c] kernel[a, b, c, k],
// every map its own output (the layer's BNs take them one by one, with no
// reshape or split of a fused tensor in between).
// ---------------------------------------------------------------------------

// A unit's channels of an NHWC tensor with a zero border: (height + 2) x (width + 2).
void GatherPadded(const Geometry& g, const float* tensor, const Unit& unit, Plane& padded) {
  const int64_t padded_width = g.width + 2;
  padded.assign((g.height + 2) * padded_width, kZero);
  const float* base = tensor + unit.image * g.cells * g.channels + unit.channel;
  for (int64_t i = 0; i < g.height; ++i) {
    for (int64_t j = 0; j < g.width; ++j) {
      std::memcpy(&padded[(i + 1) * padded_width + j + 1], base + (i * g.width + j) * g.channels,
                  unit.block * sizeof(float));
    }
  }
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

// The geometry of a depth-wise op's input (0) and kernel (1), checked.
Geometry CheckDepthwiseInputs(OpKernelContext* context, int64_t maps) {
  const Tensor& input = context->input(0);
  const Tensor& kernel = context->input(1);
  if (input.dims() != 4) {
    context->CtxFailure(InvalidArgument("input must be rank 4 (NHWC)"));
    return Geometry(TensorShape({0, 0, 0, 0}));
  }
  if (kernel.shape() != TensorShape({3, 3, input.dim_size(3), maps})) {
    context->CtxFailure(InvalidArgument("kernel must be shaped (3, 3, channels, maps), got ",
                                        kernel.shape().DebugString()));
  }
  return Geometry(input.shape());
}

class DepthwiseOp : public OpKernel {
 public:
  explicit DepthwiseOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const Tensor& kernel = context->input(1);
    const int64_t maps = context->num_outputs();
    const Geometry g = CheckDepthwiseInputs(context, maps);
    if (!context->status().ok()) return;
    std::vector<float*> outputs(maps);
    for (int64_t k = 0; k < maps; ++k) {
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(k, input.shape(), &output));
      outputs[k] = output->flat<float>().data();
    }
    if (g.units() == 0 || g.cells == 0) return;
    const float* x = input.flat<float>().data();
    const float* w = kernel.flat<float>().data();
    const int64_t padded_width = g.width + 2;
    struct Workspace {
      Plane padded, map;
      std::vector<Lanes> taps;
    };
    ForEachUnit<Workspace>(context, g, g.cells * kLanes * 20 * maps,
                           [&](const Unit& unit, Workspace& workspace) {
      auto& [padded, map, taps] = workspace;
      GatherPadded(g, x, unit, padded);
      GatherTaps(w, g.channels, maps, unit, taps);
      map.resize(g.cells);
      for (int64_t k = 0; k < maps; ++k) {
        const Lanes* t = &taps[k * 9];
        for (int64_t i = 0; i < g.height; ++i) {
          const Lanes* row0 = &padded[i * padded_width];
          const Lanes* row1 = row0 + padded_width;
          const Lanes* row2 = row1 + padded_width;
          for (int64_t j = 0; j < g.width; ++j) {
            map[i * g.width + j] = row0[j] * t[0] + row0[j + 1] * t[1] + row0[j + 2] * t[2] +
                                   row1[j] * t[3] + row1[j + 1] * t[4] + row1[j + 2] * t[5] +
                                   row2[j] * t[6] + row2[j + 1] * t[7] + row2[j + 2] * t[8];
          }
        }
        g.Scatter(map, unit, outputs[k]);
      }
    });
  }
};

class DepthwiseGradOp : public OpKernel {
 public:
  explicit DepthwiseGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const Tensor& kernel = context->input(1);
    const int64_t maps = context->num_inputs() - 2;
    const Geometry g = CheckDepthwiseInputs(context, maps);
    if (!context->status().ok()) return;
    Tensor* grad_input = nullptr;
    Tensor* grad_kernel = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, input.shape(), &grad_input));
    OP_REQUIRES_OK(context, context->allocate_output(1, kernel.shape(), &grad_kernel));
    float* dx = grad_input->flat<float>().data();
    float* dw = grad_kernel->flat<float>().data();
    std::fill_n(dw, grad_kernel->NumElements(), 0.0f);
    if (g.units() == 0 || g.cells == 0) return;
    std::vector<const float*> grads(maps);
    for (int64_t k = 0; k < maps; ++k) {
      OP_REQUIRES(context, context->input(2 + k).shape() == input.shape(),
                  InvalidArgument("every map's gradient must be shaped like the input"));
      grads[k] = context->input(2 + k).flat<float>().data();
    }
    const float* x = input.flat<float>().data();
    const float* w = kernel.flat<float>().data();
    const int64_t padded_width = g.width + 2;
    // The kernel's gradient sums over the batch: one partial sum per unit,
    // added up in a fixed order afterwards (deterministic, no locks).
    std::vector<Lanes> partial(g.units() * 9 * maps, kZero);
    struct Workspace {
      Plane padded_x, padded_g, grad;
      std::vector<Lanes> taps;
    };
    ForEachUnit<Workspace>(context, g, g.cells * kLanes * 40 * maps,
                           [&](const Unit& unit, Workspace& workspace) {
      auto& [padded_x, padded_g, grad, taps] = workspace;
      GatherPadded(g, x, unit, padded_x);
      GatherTaps(w, g.channels, maps, unit, taps);
      grad.assign(g.cells, kZero);
      Lanes* unit_partial = &partial[(unit.image * g.blocks + unit.channel / kLanes) * 9 * maps];
      for (int64_t k = 0; k < maps; ++k) {
        GatherPadded(g, grads[k], unit, padded_g);
        const Lanes* t = &taps[k * 9];
        Lanes sums[9] = {};
        for (int64_t i = 0; i < g.height; ++i) {
          for (int64_t j = 0; j < g.width; ++j) {
            // dx[i, j] = sum_{a, b} g[i - a + 1, j - b + 1] kernel[a, b] (padded: + 1).
            const Lanes* g0 = &padded_g[i * padded_width + j];  // rows i - 1 .. i + 1
            const Lanes* g1 = g0 + padded_width;
            const Lanes* g2 = g1 + padded_width;
            grad[i * g.width + j] += g2[2] * t[0] + g2[1] * t[1] + g2[0] * t[2] +
                                     g1[2] * t[3] + g1[1] * t[4] + g1[0] * t[5] +
                                     g0[2] * t[6] + g0[1] * t[7] + g0[0] * t[8];
            // d kernel[a, b] += x[i + a - 1, j + b - 1] g[i, j].
            const Lanes gij = g1[1];
            const Lanes* x0 = &padded_x[i * padded_width + j];
            const Lanes* x1 = x0 + padded_width;
            const Lanes* x2 = x1 + padded_width;
            sums[0] += x0[0] * gij, sums[1] += x0[1] * gij, sums[2] += x0[2] * gij;
            sums[3] += x1[0] * gij, sums[4] += x1[1] * gij, sums[5] += x1[2] * gij;
            sums[6] += x2[0] * gij, sums[7] += x2[1] * gij, sums[8] += x2[2] * gij;
          }
        }
        std::copy(sums, sums + 9, unit_partial + k * 9);
      }
      g.Scatter(grad, unit, dx);
    });
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
    .Attr("rectify: bool = false")
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
    .Attr("rectify: bool = false")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < 6; ++i) c->set_output(i, c->input(0));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("PdeKerasDepthwiseMaps")
    .Input("input: float")
    .Input("kernel: float")
    .Output("maps: count * float")
    .Attr("count: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->input(0));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("PdeKerasDepthwiseMapsGrad")
    .Input("input: float")
    .Input("kernel: float")
    .Input("grad_maps: count * float")
    .Output("grad_input: float")
    .Output("grad_kernel: float")
    .Attr("count: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return ::tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("PdeKerasDepthwiseMaps").Device(::tensorflow::DEVICE_CPU),
                        DepthwiseOp);
REGISTER_KERNEL_BUILDER(Name("PdeKerasDepthwiseMapsGrad").Device(::tensorflow::DEVICE_CPU),
                        DepthwiseGradOp);
REGISTER_KERNEL_BUILDER(Name("PdeKerasSolve").Device(::tensorflow::DEVICE_CPU), SolveOp);
REGISTER_KERNEL_BUILDER(Name("PdeKerasSolveGrad").Device(::tensorflow::DEVICE_CPU), SolveGradOp);

}  // namespace pde_keras
