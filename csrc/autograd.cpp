// The autograd kernels written in C++ (registered at the Autograd key: CPU and CUDA tensors alike). The ops'
// formulas are registered from Python, once per op and used by every backend (rlkernels/_ops/<family>.py);
// what is here is what every backward op shares and Python cannot express as cheaply:
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
  for (const char* op : {"discounted_returns_backward", "gae_backward", "vtrace_backward", "retrace_backward",
                         "ppo_policy_loss_backward", "value_loss_backward", "kl_penalty_backward",
                         "gather_logprobs_backward", "gather_logprobs_backward_inplace", "td_loss_backward",
                         "n_step_returns_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&rlkernels::once_differentiable>());
}

TORCH_LIBRARY_IMPL(rlkernels, ADInplaceOrView, m) {
  m.impl("gather_logprobs_backward_inplace", TORCH_FN(rlkernels::gather_logprobs_backward_inplace_version));
}
