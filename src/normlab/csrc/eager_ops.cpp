/* normlab's eager CPU path in C++: the two forward operators with their backward as a C++ autograd node.
 *
 * What it is for: a small layer's step costs more in Python than in arithmetic. normlab::batch_norm_fwd and
 * normlab::row_norm_fwd (normlab/_ops.py) carry their autograd formula in Python, so every eager step of a
 * layer paid a Python forward, a Python backward, the ctypes calls of each and the autograd nodes of the
 * views around them. Here the same kernels (norm_kernels.c, linked into this library) run inside C++
 * autograd nodes, on the input in its own shape and memory format:
 *
 *   normlab::batch_norm_eager(x, weight, bias, eps, dim, layout)      -> (y, mean, var, invstd)
 *       x's memory is layout = (A, C, B), C the feature axis dim (contiguous, or channels-last: B = 1)
 *   normlab::batch_norm_train_eager(x, ..., running buffers, ema_weight,
 *                                   var_scale)                        -> (y, status)
 *       the same, and the running statistics updated as normlab::update_running_stats_ does on the CPU
 *   normlab::row_norm_eager(x, weight, bias, eps, centered, view, red,
 *                           layout, affine_shape, stats)               -> [y, mean, var, invstd] or [y]
 *       contiguous x seen as view, normalised over its red trailing dims; layout = (R, K, G, L) for the
 *       kernels; weight/bias as the layer holds them, broadcasting as affine_shape against view
 *
 * with the contract of the Python operators (y in x's shape, statistics in x's dtype, which inputs get
 * gradients). normlab/_ops.py calls them only on eager calls with plain non-empty float32/float64 CPU
 * tensors (_ops.eager_fast); everything that traces keeps the Python operators. When the backward is itself
 * recorded (create_graph=True: Hessian-vector products), the node calls normlab::norm_backward_graph, the
 * analytic formula in differentiable tensor ops defined in Python (normlab.autograd.norm_backward), so
 * second derivatives are exact and the formula exists once.
 *
 * Built on first use by normlab/_native.py (the system C++ compiler and PyTorch's headers), loaded with
 * torch.ops.load_library. Without it, the same operators run through the Python path.
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

extern "C" {
int col_forward_f32(const float *, float *, int64_t, int64_t, int64_t, const float *, const float *, double, float *,
                    float *, float *, int);
int col_forward_f64(const double *, double *, int64_t, int64_t, int64_t, const double *, const double *, double,
                    double *, double *, double *, int);
int col_backward_f32(const float *, const float *, float *, int64_t, int64_t, int64_t, const float *, const float *,
                     const float *, float *, float *, int);
int col_backward_f64(const double *, const double *, double *, int64_t, int64_t, int64_t, const double *,
                     const double *, const double *, double *, double *, int);
void row_fwd_f32(const float *, float *, int64_t, int64_t, int64_t, int64_t, const float *, const float *, double, int,
                 float *, float *, float *, int);
void row_fwd_f64(const double *, double *, int64_t, int64_t, int64_t, int64_t, const double *, const double *, double,
                 int, double *, double *, double *, int);
int row_bwd_f32(const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t, const float *, const float *,
                const float *, int, float *, float *, int);
int ema_update_f32(float *, float *, const float *, const float *, int64_t, double, double);
int ema_update_f64(double *, double *, const double *, const double *, int64_t, double, double);
int row_bwd_f64(const double *, const double *, double *, int64_t, int64_t, int64_t, int64_t, const double *,
                const double *, const double *, int, double *, double *, int);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kMinParallel = 1 << 15; /* elements below which one thread is faster (as _native._MIN_PARALLEL) */

int threads_for(int64_t numel) { return numel < kMinParallel ? 1 : std::max(1, at::get_num_threads()); }

template <typename T>
const T *ptr(const at::Tensor &t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T *mut(const at::Tensor &t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

/* NL_ENOMEM, the kernels' only failure: torch.OutOfMemoryError with what to do, never a crash */
void check_status(int status, const char *name) {
  TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "normlab: the native kernel ", name,
                   " could not allocate its scratch memory; free memory, use smaller batches, or set NORMLAB_NATIVE=0 "
                   "to use the tensor-op path");
}

/* The Python formula for a recorded backward: normlab::norm_backward_graph (normlab/_ops.py). */
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_graph(const at::Tensor &grad, const at::Tensor &x,
                                                              const c10::optional<at::Tensor> &weight, double eps,
                                                              std::vector<int64_t> dims, bool centered,
                                                              std::array<bool, 3> need,
                                                              c10::optional<std::vector<int64_t>> affine_shape) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("normlab::norm_backward_graph", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor &, const at::Tensor &, const c10::optional<at::Tensor> &, double,
                           at::IntArrayRef, bool, std::array<bool, 3>, at::OptionalIntArrayRef)>();
  at::OptionalIntArrayRef shape = affine_shape ? at::OptionalIntArrayRef(*affine_shape) : c10::nullopt;
  return op.call(grad, x, weight, eps, dims, centered, need, shape);
}

/* ------------------------------------------------------------------------------------------ column */

/* What a node keeps besides its tensors, packed in one saved entry (each entry costs an allocation):
 * [weight given, bias given, then the operator's own integers]. Autograd numbers a node's input edges over
 * the tensors given only, so needs() maps (x, weight, bias) onto them. */
std::tuple<bool, bool, bool> needs(AutogradContext *ctx, const std::vector<int64_t> &k) {
  const bool w = k[0], b = k[1];
  return {ctx->needs_input_grad(0), w && ctx->needs_input_grad(1), b && ctx->needs_input_grad(w ? 2 : 1)};
}

bool recorded(const at::Tensor &x, const c10::optional<at::Tensor> &weight, const c10::optional<at::Tensor> &bias) {
  if (!at::GradMode::is_enabled()) return false;
  return x.requires_grad() || (weight && weight->requires_grad()) || (bias && bias->requires_grad());
}

/* x's memory as (A, C, B): contiguous x, or x whose memory is contiguous once the feature axis `dim` is moved
 * last (channels-last), then (A * B, C, 1). The differentiable view the recorded backward needs. */
at::Tensor column_view(const at::Tensor &t, int64_t dim, int64_t A, int64_t C, int64_t B) {
  if (B == 1 && !t.is_contiguous()) return t.movedim(dim, -1).reshape({A, C, 1});
  return t.reshape({A, C, B});
}

at::Tensor from_column_view(const at::Tensor &t3, const at::Tensor &like, int64_t dim) {
  if (like.is_contiguous()) return t3.view(like.sizes());
  std::vector<int64_t> moved(like.sizes().begin(), like.sizes().end());
  const int64_t c = moved[dim];
  moved.erase(moved.begin() + dim);
  moved.push_back(c);
  return t3.reshape(moved).movedim(-1, dim);
}

/* grad in x's memory layout (the kernels index both the same way) */
at::Tensor same_layout(const at::Tensor &grad, const at::Tensor &x) {
  return grad.strides() == x.strides() ? grad : at::empty_like(x).copy_(grad);
}

using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

/* The forward kernel: y in x's memory format, per-channel mean, biased var and invstd in x's dtype. */
Stats4 column_forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias, double eps, int64_t A,
                      int64_t C, int64_t B) {
  at::Tensor y = at::empty_like(x); /* x's strides: the same (A, C, B) memory */
  at::Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options()),
             invstd = at::empty({C}, x.options());
  const int nt = threads_for(x.numel());
  int status;
  if (x.scalar_type() == at::kFloat) {
    status = col_forward_f32(ptr<float>(x), mut<float>(y), A, C, B, ptr<float>(weight), ptr<float>(bias), eps,
                             mut<float>(mean), mut<float>(var), mut<float>(invstd), nt);
  } else {
    status = col_forward_f64(ptr<double>(x), mut<double>(y), A, C, B, ptr<double>(weight), ptr<double>(bias), eps,
                             mut<double>(mean), mut<double>(var), mut<double>(invstd), nt);
  }
  check_status(status, "col_forward");
  return {y, mean, var, invstd};
}

struct ColumnNorm : public torch::autograd::Function<ColumnNorm> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x, const c10::optional<at::Tensor> &weight_opt,
                               const c10::optional<at::Tensor> &bias_opt, double eps, int64_t dim,
                               at::IntArrayRef layout) {
    const at::Tensor weight = weight_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
    auto [y, mean, var, invstd] = column_forward(x, weight, bias, eps, layout[0], layout[1], layout[2]);
    ctx->set_materialize_grads(false); /* no zeros for the statistics' (non-differentiable) gradients */
    ctx->save_for_backward({x, weight, mean, invstd});
    ctx->saved_data["k"] =
        std::vector<int64_t>{weight.defined(), bias.defined(), dim, layout[0], layout[1], layout[2]};
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var, invstd});
    return {y, mean, var, invstd};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor never;
    if (!grads[0].defined()) return {never, never, never, never, never, never}; /* y was not used */
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const auto k = ctx->saved_data["k"].toIntVector();
    const auto [nx, nw, nb] = needs(ctx, k);
    const int64_t dim = k[2], A = k[3], C = k[4], B = k[5];
    if (at::GradMode::is_enabled()) { /* create_graph: differentiate the analytic formula */
      c10::optional<at::Tensor> w;
      if (weight.defined()) w = weight.view({1, C, 1});
      auto [dx3, dw, db] = backward_graph(column_view(grads[0], dim, A, C, B), column_view(x, dim, A, C, B), w,
                                          ctx->saved_data["eps"].toDouble(), {0, 2}, true, {nx, nw, nb},
                                          std::vector<int64_t>{1, C, 1});
      return {nx ? from_column_view(dx3, x, dim) : never, nw ? dw.view({C}) : never, nb ? db.view({C}) : never,
              never, never, never};
    }
    at::Tensor g = same_layout(grads[0], x);
    at::Tensor dx = nx ? at::empty_like(x) : never;
    at::Tensor dw = nw ? at::empty({C}, x.options()) : never;
    at::Tensor db = nb ? at::empty({C}, x.options()) : never;
    const int nt = threads_for(x.numel());
    int status;
    if (x.scalar_type() == at::kFloat) {
      status = col_backward_f32(ptr<float>(g), ptr<float>(x), mut<float>(dx), A, C, B, ptr<float>(mean),
                                ptr<float>(invstd), ptr<float>(weight), mut<float>(dw), mut<float>(db), nt);
    } else {
      status = col_backward_f64(ptr<double>(g), ptr<double>(x), mut<double>(dx), A, C, B, ptr<double>(mean),
                                ptr<double>(invstd), ptr<double>(weight), mut<double>(dw), mut<double>(db), nt);
    }
    check_status(status, "col_backward");
    return {dx, dw, db, never, never, never};
  }
};

Stats4 batch_norm_eager(const at::Tensor &x, const c10::optional<at::Tensor> &weight,
                        const c10::optional<at::Tensor> &bias, double eps, int64_t dim, at::IntArrayRef layout) {
  if (!recorded(x, weight, bias)) /* nothing to differentiate: the kernel alone */
    return column_forward(x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), eps, layout[0], layout[1],
                          layout[2]);
  auto out = ColumnNorm::apply(x, weight, bias, eps, dim, layout);
  return {out[0], out[1], out[2], out[3]};
}

/* BatchNorm's training step: batch_norm_eager, then the batch statistics folded into the running buffers with
 * the new-batch weight ema_weight and the variance scaled by var_scale (n / (n - 1) for the unbiased
 * estimate), as normlab::update_running_stats_ does on the CPU: the ema_update kernel changes nothing when a
 * statistic is not finite, num_batches_tracked counts the batches used, num_nonfinite_batches the others.
 * Returns y and the kernel's status (1 used, 0 non-finite, 2 variance overflow), for the caller to warn. */
std::tuple<at::Tensor, int64_t> batch_norm_train_eager(const at::Tensor &x, const c10::optional<at::Tensor> &weight,
                                                       const c10::optional<at::Tensor> &bias, double eps,
                                                       int64_t dim, at::IntArrayRef layout,
                                                       const at::Tensor &running_mean, const at::Tensor &running_var,
                                                       const at::Tensor &num_batches_tracked,
                                                       const at::Tensor &num_nonfinite_batches, double ema_weight,
                                                       double var_scale) {
  auto [y, mean, var, invstd] = batch_norm_eager(x, weight, bias, eps, dim, layout);
  const int64_t C = mean.numel();
  int status;
  if (x.scalar_type() == at::kFloat) {
    status = ema_update_f32(mut<float>(running_mean), mut<float>(running_var), ptr<float>(mean), ptr<float>(var), C,
                            ema_weight, var_scale);
  } else {
    status = ema_update_f64(mut<double>(running_mean), mut<double>(running_var), ptr<double>(mean), ptr<double>(var),
                            C, ema_weight, var_scale);
  }
  (status == 1 ? num_batches_tracked : num_nonfinite_batches).add_(1);
  return {y, status};
}

/* --------------------------------------------------------------------------------------------- row */

/* The forward kernel: y in x's shape, per-row statistics shaped as view's leading dims then red ones. */
Stats4 row_forward(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias, double eps, bool centered,
                   at::IntArrayRef view, int64_t red, at::IntArrayRef layout) {
  const int64_t R = layout[0], K = layout[1], G = layout[2], L = layout[3];
  c10::SmallVector<int64_t, 8> keep(view.begin(), view.end() - red);
  keep.append(red, 1);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty(keep, x.options()), var = at::empty(keep, x.options()),
             rstd = at::empty(keep, x.options());
  const int nt = threads_for(x.numel());
  if (x.scalar_type() == at::kFloat) {
    row_fwd_f32(ptr<float>(x), mut<float>(y), R, K, G, L, ptr<float>(weight), ptr<float>(bias), eps, centered,
                mut<float>(mean), mut<float>(var), mut<float>(rstd), nt);
  } else {
    row_fwd_f64(ptr<double>(x), mut<double>(y), R, K, G, L, ptr<double>(weight), ptr<double>(bias), eps, centered,
                mut<double>(mean), mut<double>(var), mut<double>(rstd), nt);
  }
  return {y, mean, var, rstd};
}

struct RowNorm : public torch::autograd::Function<RowNorm> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x, const c10::optional<at::Tensor> &weight_opt,
                               const c10::optional<at::Tensor> &bias_opt, double eps, bool centered,
                               at::IntArrayRef view, int64_t red, at::IntArrayRef layout,
                               at::IntArrayRef affine_shape, bool stats) {
    const at::Tensor weight = weight_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
    auto [y, mean, var, rstd] = row_forward(x, weight, bias, eps, centered, view, red, layout);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    /* [weight given, bias given, centered, red, R, K, G, L, len(view), view..., affine_shape...] */
    std::vector<int64_t> k{weight.defined(), bias.defined(), centered, red};
    k.insert(k.end(), layout.begin(), layout.end());
    k.push_back((int64_t)view.size());
    k.insert(k.end(), view.begin(), view.end());
    k.insert(k.end(), affine_shape.begin(), affine_shape.end());
    ctx->saved_data["k"] = std::move(k);
    ctx->saved_data["eps"] = eps;
    if (!stats) return {y}; /* each output costs its autograd bookkeeping: only y when the caller needs no more */
    ctx->mark_non_differentiable({mean, var, rstd});
    return {y, mean, var, rstd};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor never;
    if (!grads[0].defined()) return {never, never, never, never, never, never, never, never, never, never};
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const auto k = ctx->saved_data["k"].toIntVector();
    const auto [nx, nw, nb] = needs(ctx, k);
    const bool centered = k[2];
    const int64_t red = k[3], R = k[4], K = k[5], G = k[6], L = k[7], nview = k[8];
    if (at::GradMode::is_enabled()) { /* create_graph: differentiate the analytic formula */
      const std::vector<int64_t> view(k.begin() + 9, k.begin() + 9 + nview), affine_shape(k.begin() + 9 + nview, k.end());
      std::vector<int64_t> dims;
      for (int64_t d = nview - red; d < nview; ++d) dims.push_back(d);
      c10::optional<at::Tensor> w;
      if (weight.defined()) w = weight.view(affine_shape);
      c10::optional<std::vector<int64_t>> shape;
      if (weight.defined() || bias.defined()) shape = affine_shape;
      auto [dx, dw, db] = backward_graph(grads[0].reshape(view), x.reshape(view), w,
                                         ctx->saved_data["eps"].toDouble(), dims, centered, {nx, nw, nb}, shape);
      return {nx ? dx.view(x.sizes()) : never, nw ? dw.view(weight.sizes()) : never,
              nb ? db.view(bias.sizes()) : never, never, never, never, never, never, never, never};
    }
    const int64_t P = L ? G * (K / L) : 0;
    at::Tensor g = grads[0].contiguous();
    at::Tensor dx = nx ? at::empty_like(x, at::MemoryFormat::Contiguous) : never;
    const bool params = nw || nb;
    at::Tensor dw = params ? at::empty({P}, x.options()) : never;
    at::Tensor db = params ? at::empty({P}, x.options()) : never;
    const int nt = threads_for(x.numel());
    int status;
    if (x.scalar_type() == at::kFloat) {
      status = row_bwd_f32(ptr<float>(g), ptr<float>(x), mut<float>(dx), R, K, G, L, ptr<float>(weight),
                           ptr<float>(mean), ptr<float>(rstd), centered, mut<float>(dw), mut<float>(db), nt);
    } else {
      status = row_bwd_f64(ptr<double>(g), ptr<double>(x), mut<double>(dx), R, K, G, L, ptr<double>(weight),
                           ptr<double>(mean), ptr<double>(rstd), centered, mut<double>(dw), mut<double>(db), nt);
    }
    check_status(status, "row_bwd");
    return {dx, nw ? dw.view(weight.sizes()) : never, nb ? db.view(bias.sizes()) : never,
            never, never, never, never, never, never, never};
  }
};

/* [y, mean, var, rstd] when `stats`, else [y] */
std::vector<at::Tensor> row_norm_eager(const at::Tensor &x, const c10::optional<at::Tensor> &weight,
                                       const c10::optional<at::Tensor> &bias, double eps, bool centered,
                                       at::IntArrayRef view, int64_t red, at::IntArrayRef layout,
                                       at::IntArrayRef affine_shape, bool stats) {
  if (recorded(x, weight, bias)) return RowNorm::apply(x, weight, bias, eps, centered, view, red, layout, affine_shape, stats);
  auto [y, mean, var, rstd] =
      row_forward(x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), eps, centered, view, red, layout);
  if (!stats) return {y};
  return {y, mean, var, rstd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normlab, m) {
  m.def(
      "batch_norm_eager(Tensor x, Tensor? weight, Tensor? bias, float eps, int dim, int[3] layout) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_train_eager(Tensor x, Tensor? weight, Tensor? bias, float eps, int dim, int[3] layout, "
      "Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
      "Tensor(d!) num_nonfinite_batches, float ema_weight, float var_scale) -> (Tensor, int)");
  m.def(
      "row_norm_eager(Tensor x, Tensor? weight, Tensor? bias, float eps, bool centered, int[] view, int red, "
      "int[4] layout, int[] affine_shape, bool stats) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(normlab, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_eager", batch_norm_eager);
  m.impl("batch_norm_train_eager", batch_norm_train_eager);
  m.impl("row_norm_eager", row_norm_eager);
}
