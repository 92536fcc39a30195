"""TorchRL's value-estimator modules (``GAE``, ``TDLambdaEstimator``, ``VTrace``) computing on rlkernels.

Imported by :mod:`rlkernels.integrations.torchrl` on first access to one of the classes (this module imports
torchrl). Each class subclasses TorchRL's own and keeps all of it (constructor, keys, value-network calls,
``shifted``, advantage standardization, ``make_value_estimator``) except the estimator it calls: its
``forward`` and ``value_estimate`` are TorchRL's methods, the same code, whose global names
``generalized_advantage_estimate``, ``vec_generalized_advantage_estimate``, ``td_lambda_return_estimate``,
``vec_td_lambda_return_estimate`` and ``vtrace_advantage_estimate`` resolve to the adapters of
:mod:`rlkernels.integrations.torchrl` instead of ``torchrl.objectives.value.functional``. Nothing in torchrl is
modified: TorchRL's own classes keep computing as before.

gamma, lmbda, rho_thresh and c_thresh are buffers (0-d tensors) in TorchRL, moved to the data's device by the
module's forward. The kernels take them as host numbers, and reading a GPU tensor synchronizes the host with
the device, so each module keeps the host value of each buffer: read once when first used, and again only when
the buffer is replaced or written in place (its version counter changes: ``load_state_dict``, ``fill_``);
TorchRL's own move of the buffer to the data's device keeps the value. A CPU buffer is read without any device
involved.
"""

from __future__ import annotations

import contextvars
import functools
import types

import torchrl.objectives.value.advantages as _adv
from tensordict.nn import dispatch as _dispatch

from . import torchrl as _fn

__all__ = ["GAE", "TDLambdaEstimator", "VTrace"]

# (module, {buffer name: host float}) of the estimator module whose forward or value_estimate is running.
_HOST = contextvars.ContextVar("rlkernels_torchrl_host_scalars", default=None)


def _host(name, value):
    """The module's host copy of ``value`` when it is the module's buffer ``name``; otherwise ``value``."""
    current = _HOST.get()
    if current is not None:
        module, values = current
        if name in values and value is module._buffers.get(name):
            return values[name]
    return value


def _gae(gamma, lmbda, *args, **kwargs):
    return _fn.generalized_advantage_estimate(_host("gamma", gamma), _host("lmbda", lmbda), *args, **kwargs)


def _vec_gae(gamma, lmbda, *args, **kwargs):
    return _fn.vec_generalized_advantage_estimate(_host("gamma", gamma), _host("lmbda", lmbda), *args, **kwargs)


def _td_lambda(gamma, lmbda, *args, **kwargs):
    return _fn.td_lambda_return_estimate(_host("gamma", gamma), _host("lmbda", lmbda), *args, **kwargs)


def _vec_td_lambda(gamma, lmbda, *args, **kwargs):
    return _fn.vec_td_lambda_return_estimate(_host("gamma", gamma), _host("lmbda", lmbda), *args, **kwargs)


def _vtrace(gamma, *args, rho_thresh=1.0, c_thresh=1.0, **kwargs):
    return _fn.vtrace_advantage_estimate(_host("gamma", gamma), *args, rho_thresh=_host("rho_thresh", rho_thresh),
                                         c_thresh=_host("c_thresh", c_thresh), **kwargs)


_ESTIMATORS = {
    "generalized_advantage_estimate": _gae,
    "vec_generalized_advantage_estimate": _vec_gae,
    "td_lambda_return_estimate": _td_lambda,
    "vec_td_lambda_return_estimate": _vec_td_lambda,
    "vtrace_advantage_estimate": _vtrace,
}


def _on_rlkernels(method, decorate=False):
    """TorchRL's ``method`` (its undecorated code) with the estimators' global names bound to rlkernels."""
    raw = method
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__
    called = [name for name in _ESTIMATORS if name in raw.__code__.co_names]
    if raw.__closure__ or not called:
        raise ImportError(f"rlkernels.integrations.torchrl: {raw.__qualname__} of this torchrl release does not "
                          "have the layout these modules were written for (torchrl 0.14)")
    namespace = dict(raw.__globals__)
    namespace.update({name: _ESTIMATORS[name] for name in called})
    fn = types.FunctionType(raw.__code__, namespace, raw.__name__, raw.__defaults__)
    fn.__kwdefaults__ = raw.__kwdefaults__
    fn.__qualname__, fn.__doc__ = raw.__qualname__, raw.__doc__
    if decorate:  # TorchRL's decorators of forward, in TorchRL's order
        fn = _adv._self_set_skip_existing(_adv._self_set_grad_enabled(_dispatch(fn)))

    @functools.wraps(fn)
    def with_host_scalars(self, *args, **kwargs):
        token = _HOST.set((self, self._rlkernels_host_scalars()))
        try:
            return fn(self, *args, **kwargs)
        finally:
            moved = _HOST.get()
            _HOST.reset(token)
            self._rlkernels_keep_moved(moved[1])

    return with_host_scalars


class _HostScalars:
    """The host values of the module's scalar buffers, read once per buffer version."""

    _rlkernels_scalars: tuple[str, ...] = ()

    def _rlkernels_host_scalars(self):
        cache = self.__dict__.setdefault("_rlkernels_host", {})
        values = {}
        for name in self._rlkernels_scalars:
            buf = self._buffers.get(name)
            if buf is None or buf.numel() != 1:
                continue  # a per-step tensor: the adapter explains that it takes scalars only
            hit = cache.get(name)
            if hit is None or hit[0] is not buf or hit[1] != buf._version:
                hit = (buf, buf._version, float(buf.detach().reshape(())))
                cache[name] = hit
            values[name] = hit[2]
        return values

    def _rlkernels_keep_moved(self, values):
        """TorchRL's forward replaces a buffer by its copy on the data's device: same value, kept without a read."""
        cache = self.__dict__.get("_rlkernels_host", {})
        for name, value in values.items():
            buf = self._buffers.get(name)
            if buf is not None and cache.get(name, (None,))[0] is not buf and buf._version == 0:
                cache[name] = (buf, 0, value)


class GAE(_HostScalars, _adv.GAE):
    """TorchRL's ``GAE`` (same constructor, keys and call) with the advantage from :func:`rlkernels.gae`.

    ``loss_module.make_value_estimator(GAE(gamma=..., lmbda=..., value_network=...))``, or the class with its
    keyword arguments, puts it in a TorchRL loss.
    """

    _rlkernels_scalars = ("gamma", "lmbda")
    forward = _on_rlkernels(_adv.GAE.forward, decorate=True)
    value_estimate = _on_rlkernels(_adv.GAE.value_estimate)


class TDLambdaEstimator(_HostScalars, _adv.TDLambdaEstimator):
    """TorchRL's ``TDLambdaEstimator`` with the TD(lambda) return from one :func:`rlkernels.linear_scan`."""

    _rlkernels_scalars = ("gamma", "lmbda")
    value_estimate = _on_rlkernels(_adv.TDLambdaEstimator.value_estimate)


class VTrace(_HostScalars, _adv.VTrace):
    """TorchRL's ``VTrace`` with the targets and advantages from :func:`rlkernels.vtrace`."""

    _rlkernels_scalars = ("gamma", "rho_thresh", "c_thresh")
    forward = _on_rlkernels(_adv.VTrace.forward, decorate=True)
