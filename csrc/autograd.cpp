// Autograd kernels written in C++ (registered at the Autograd key: CPU and CUDA tensors alike). For the ops
// here the autograd formula runs without Python: torch.library's Python autograd layer costs tens of
// microseconds per call and per backward, more than the kernels themselves at replay-batch sizes. The other
// ops register their formulas from Python (rlkernels/<family>.py); the Triton variants keep theirs there.
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

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
                                                           c10::string_view, double, c10::string_view)>();
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor grad_loss = maybe(grads[0]), grad_td = maybe(grads[1]);
    if (!grad_loss && !grad_td) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const std::string loss = ctx->saved_data["loss"].toStringRef();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    auto [grad_q, grad_targets] = op.call(grad_loss, grad_td, saved[0], saved[1], saved[2], maybe(saved[3]), loss,
                                          ctx->saved_data["delta"].toDouble(), reduction);
    return {grad_q, Tensor(), grad_targets, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> td_loss_autograd(const Tensor& q, const Tensor& actions, const Tensor& targets,
                                            const OptTensor& weights, c10::string_view loss, double delta,
                                            c10::string_view reduction) {
  const variable_list out = TdLossFunction::apply(q, actions, targets, weights, loss, delta, reduction);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace rlkernels

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("td_loss", &rlkernels::td_loss_autograd); }
