// Autograd kernels written in C++ (registered at the Autograd key: CPU and CUDA tensors alike) for the ops
// whose call overhead matters most: discounted_returns, gae, td_loss. Their formulas run without Python:
// torch.library's Python autograd layer runs on every call, with or without gradients (about 4 us against 0.7 us
// here, docs/performance.md), a third of a rollout-sized call. The other ops register their formulas from Python
// (rlkernels/_ops/<family>.py), and so do the Triton variants of these three, with the same formulas.
//
// The backward ops are differentiable once (docs/design.md §2): called with inputs that require grad while
// grad mode is on (a backward with create_graph=True), their outputs end in an error node, so differentiating
// them again raises instead of giving silent zeros. The in-place backward of gather_logprobs bumps the
// version counter of the logits it overwrites, as every in-place op does, so a node that saved them fails
// with "modified by an inplace operation" instead of using the overwritten values.
#include <ATen/core/stack.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace rlkernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor maybe(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// td_loss: (loss, td_errors) = td_loss(q, actions, targets, weights); gradients for q and targets from
// td_loss_backward (one dense gradient for q, one non-zero per row). weights are data (the wrapper detaches them).
class TdLossFunction : public torch::autograd::Function<TdLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& actions, const Tensor& targets,
                               const OptTensor& weights, c10::string_view loss, double delta,
                               c10::string_view reduction) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::td_loss", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const OptTensor&, c10::string_view, double,
                                                           c10::string_view)>();
    Tensor out, td;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, td) = op.call(q, actions, targets, weights, loss, delta, reduction);
    }
    ctx->save_for_backward({q, actions, targets, weights.value_or(Tensor())});
    // The td_errors, so the backward need not gather q again: kept detached (an output saved as such would
    // hold this node) with their version, and passed to the backward only while the caller has not modified
    // them in place (priority updates may: then the backward gathers from q instead of failing).
    if (q.is_cpu()) {
      ctx->saved_data["td"] = td.detach();
      ctx->saved_data["td_version"] = static_cast<int64_t>(td._version());
    }
    ctx->saved_data["loss"] = std::string(loss);
    ctx->saved_data["delta"] = delta;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->set_materialize_grads(false);  // td_errors is rarely differentiated: no zero-filled gradient for it
    return {out, td};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::td_loss_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const OptTensor&, const OptTensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, const OptTensor&,
                                                           c10::string_view, double, c10::string_view,
                                                           const OptTensor&)>();
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor grad_loss = maybe(grads[0]), grad_td = maybe(grads[1]);
    if (!grad_loss && !grad_td) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const std::string loss = ctx->saved_data["loss"].toStringRef();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    OptTensor td;
    if (ctx->saved_data.count("td") != 0) {
      const Tensor t = ctx->saved_data["td"].toTensor();
      if (static_cast<int64_t>(t._version()) == ctx->saved_data["td_version"].toInt()) td = t;
    }
    auto [grad_q, grad_targets] = op.call(grad_loss, grad_td, saved[0], saved[1], saved[2], maybe(saved[3]), loss,
                                          ctx->saved_data["delta"].toDouble(), reduction, td);
    return {grad_q, Tensor(), grad_targets, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The gradient g cast to the dtype an input had (ScalarType saved as an int), or undefined where it had none.
Tensor cast_like(const Tensor& g, const c10::IValue& dtype) {
  if (dtype.isNone() || !g.defined()) return Tensor();
  return g.to(static_cast<at::ScalarType>(dtype.toInt()));
}

c10::IValue dtype_of(const OptTensor& t) {
  return t.has_value() && t->defined() ? c10::IValue(static_cast<int64_t>(t->scalar_type())) : c10::IValue();
}

// discounted_returns: gradients for rewards, next_values and bootstrap_value from discounted_returns_backward (a
// forward scan of the upstream gradient); flags, offsets and gamma are data.
class DiscountedReturnsFunction : public torch::autograd::Function<DiscountedReturnsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& rewards, const OptTensor& next_values,
                               const OptTensor& bootstrap_value, const OptTensor& terminated,
                               const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
                               double gamma) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::discounted_returns", "")
                         .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&, double)>();
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(rewards, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma);
    }
    ctx->save_for_backward({rewards, terminated.value_or(Tensor()), truncated.value_or(Tensor()),
                            mask.value_or(Tensor()), cu_seqlens.value_or(Tensor())});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["next_values"] = dtype_of(next_values);
    ctx->saved_data["bootstrap_value"] = dtype_of(bootstrap_value);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::discounted_returns_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const OptTensor&, const OptTensor&,
                                                                   const OptTensor&, const OptTensor&,
                                                                   const OptTensor&, const Tensor&, double, bool)>();
    const variable_list saved = ctx->get_saved_variables();
    const bool has_next = !ctx->saved_data["next_values"].isNone();
    auto [g_r, g_next, g_boot] = op.call(maybe(grads[0]), maybe(saved[1]), maybe(saved[2]), maybe(saved[3]),
                                         maybe(saved[4]), saved[0], ctx->saved_data["gamma"].toDouble(), has_next);
    return {g_r.to(saved[0].scalar_type()), cast_like(g_next, ctx->saved_data["next_values"]),
            cast_like(g_boot, ctx->saved_data["bootstrap_value"]), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// gae: gradients for rewards, values, next_values and bootstrap_value from gae_backward.
class GaeFunction : public torch::autograd::Function<GaeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& rewards, const Tensor& values,
                               const OptTensor& next_values, const OptTensor& bootstrap_value,
                               const OptTensor& terminated, const OptTensor& truncated, const OptTensor& mask,
                               const OptTensor& cu_seqlens, double gamma, double lam) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::gae", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                           const OptTensor&, const OptTensor&, const OptTensor&,
                                                           const OptTensor&, const OptTensor&, double, double)>();
    Tensor adv, ret;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(adv, ret) = op.call(rewards, values, next_values, bootstrap_value, terminated, truncated, mask,
                                   cu_seqlens, gamma, lam);
    }
    ctx->save_for_backward({rewards, terminated.value_or(Tensor()), truncated.value_or(Tensor()),
                            mask.value_or(Tensor()), cu_seqlens.value_or(Tensor())});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["lam"] = lam;
    ctx->saved_data["values"] = dtype_of(values);
    ctx->saved_data["next_values"] = dtype_of(next_values);
    ctx->saved_data["bootstrap_value"] = dtype_of(bootstrap_value);
    ctx->set_materialize_grads(false);  // an unused output's gradient is absent, not a tensor of zeros
    return {adv, ret};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rlkernels::gae_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const Tensor&, double, double, bool)>();
    const variable_list saved = ctx->get_saved_variables();
    const bool has_next = !ctx->saved_data["next_values"].isNone();
    auto [g_r, g_v, g_next, g_boot] =
        op.call(maybe(grads[0]), maybe(grads[1]), maybe(saved[1]), maybe(saved[2]), maybe(saved[3]), maybe(saved[4]),
                saved[0], ctx->saved_data["gamma"].toDouble(), ctx->saved_data["lam"].toDouble(), has_next);
    return {g_r.to(saved[0].scalar_type()), cast_like(g_v, ctx->saved_data["values"]),
            cast_like(g_next, ctx->saved_data["next_values"]), cast_like(g_boot, ctx->saved_data["bootstrap_value"]),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor discounted_returns_autograd(const Tensor& rewards, const OptTensor& next_values,
                                   const OptTensor& bootstrap_value, const OptTensor& terminated,
                                   const OptTensor& truncated, const OptTensor& mask, const OptTensor& cu_seqlens,
                                   double gamma) {
  return DiscountedReturnsFunction::apply(rewards, next_values, bootstrap_value, terminated, truncated, mask,
                                          cu_seqlens, gamma)[0];
}

std::tuple<Tensor, Tensor> gae_autograd(const Tensor& rewards, const Tensor& values, const OptTensor& next_values,
                                        const OptTensor& bootstrap_value, const OptTensor& terminated,
                                        const OptTensor& truncated, const OptTensor& mask,
                                        const OptTensor& cu_seqlens, double gamma, double lam) {
  const variable_list out = GaeFunction::apply(rewards, values, next_values, bootstrap_value, terminated, truncated,
                                               mask, cu_seqlens, gamma, lam);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> td_loss_autograd(const Tensor& q, const Tensor& actions, const Tensor& targets,
                                            const OptTensor& weights, c10::string_view loss, double delta,
                                            c10::string_view reduction) {
  const variable_list out = TdLossFunction::apply(q, actions, targets, weights, loss, delta, reduction);
  return {out[0], out[1]};
}

// The Autograd kernel of every backward op: runs the op below autograd, and when a graph is being created
// through it (grad mode on, an input that requires grad), makes an error node the grad_fn of its float outputs,
// with edges to those inputs, so that the engine reaches it whenever they are differentiated again.
void once_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t n_args = op.schema().arguments().size(), n_rets = op.schema().returns().size();
  torch::autograd::variable_list graph_inputs;
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& v : torch::jit::last(*stack, n_args))
      if (v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()) graph_inputs.push_back(v.toTensor());
  }
  auto name = [&] { return op.schema().name().substr(op.schema().name().find("::") + 2); };
  TORCH_CHECK(graph_inputs.empty() || n_rets > 0, "rlkernels.", name(),
              ": the in-place backward cannot be part of a graph (create_graph=True); use inplace_backward=False");
  {
    at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
  }
  if (graph_inputs.empty()) return;
  auto error = c10::make_intrusive<torch::autograd::Error>(
      "rlkernels." + name() + ": second-order gradients are not implemented (the backward is differentiable once: "
                              "a graph created through it with create_graph=True cannot be differentiated again)",
      torch::autograd::collect_next_edges(graph_inputs));
  for (size_t i = stack->size() - n_rets; i < stack->size(); ++i) {
    const c10::IValue& v = (*stack)[i];
    if (v.isTensor() && v.toTensor().defined() && at::isFloatingType(v.toTensor().scalar_type()))
      torch::autograd::set_history(v.toTensor(), error);
  }
}

// gather_logprobs_backward_inplace writes over `logits`: their version goes up after the write.
void gather_logprobs_backward_inplace_version(c10::DispatchKeySet ks, const OptTensor& grad_logp,
                                              const OptTensor& grad_entropy, const Tensor& logits,
                                              const Tensor& tokens, const Tensor& lse, const Tensor& entropy,
                                              double temperature, std::optional<int64_t> ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rlkernels::gather_logprobs_backward_inplace", "")
                       .typed<void(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, double, std::optional<int64_t>)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, grad_logp, grad_entropy, logits, tokens, lse, entropy,
                  temperature, ignore_index);
  }
  torch::autograd::impl::bump_version(logits);
}

}  // namespace
}  // namespace rlkernels

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) {
  m.impl("discounted_returns", &rlkernels::discounted_returns_autograd);
  m.impl("gae", &rlkernels::gae_autograd);
  m.impl("td_loss", &rlkernels::td_loss_autograd);
  for (const char* op : {"discounted_returns_backward", "gae_backward", "vtrace_backward", "retrace_backward",
                         "ppo_policy_loss_backward", "value_loss_backward", "kl_penalty_backward",
                         "gather_logprobs_backward", "gather_logprobs_backward_inplace", "td_loss_backward",
                         "n_step_returns_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&rlkernels::once_differentiable>());
}

TORCH_LIBRARY_IMPL(rlkernels, ADInplaceOrView, m) {
  m.impl("gather_logprobs_backward_inplace", TORCH_FN(rlkernels::gather_logprobs_backward_inplace_version));
}
