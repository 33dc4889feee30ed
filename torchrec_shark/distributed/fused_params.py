"""TorchRec's ``fused_params`` (how TBE's optimizer is configured) as a :class:`SparseOptimizerSpec`.

A sharder's ``fused_params`` choose the fused optimizer of the tables it shards, as they do for
stock tables (``EmbeddingBagCollectionSharder(fused_params={...})``). Every key either maps onto the
spec or is refused with an error naming it: a setting is never dropped silently.

Supported: ``optimizer`` (``EmbOptimType.EXACT_SGD``, ``EXACT_ADAGRAD``, ``EXACT_ROWWISE_ADAGRAD``,
``ADAM``), ``learning_rate``, ``eps``, ``beta1`` / ``beta2`` (Adam), ``weight_decay`` (Adagrads with
``weight_decay_mode=WeightDecayMode.L2``, as TBE applies it; Adam's own decay). Keys that only tune
FBGEMM's caching/prefetching of a TBE (no effect on values) are accepted and have nothing to do here.

Example::

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    spec = optimizer_spec_from_fused_params(
        {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.5}, SparseOptimizerSpec("sgd", lr=0.1)
    )   # SparseOptimizerSpec("adagrad", lr=0.5, ...)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import torch

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

from torchrec_shark.modules.base import SparseOptimizerSpec

OPTIMIZER_NAMES: Dict[EmbOptimType, str] = {
    EmbOptimType.EXACT_SGD: "sgd",
    EmbOptimType.EXACT_ADAGRAD: "adagrad",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
    EmbOptimType.ADAM: "adam",
}

# fused_params key -> SparseOptimizerSpec field
_SPEC_FIELDS = {"learning_rate": "lr", "eps": "eps", "beta1": "beta1", "beta2": "beta2", "weight_decay": "weight_decay"}

# Keys that tune how a TBE caches or prefetches rows, or what TorchRec's sharding adds for its own
# kernels: they change no value, and compressed tables have no such machinery to tune.
NO_EFFECT_KEYS = frozenset(
    {
        "cache_load_factor",
        "cache_algorithm",
        "cache_reserved_memory",
        "cache_sets",
        "prefetch_pipeline",
        "multipass_prefetch_config",
        "enforce_hbm",
        "bounds_check_mode",
    }
)

# Optimizers whose update has first/second-moment coefficients.
_HAS_BETAS = {"adam"}


class UnsupportedFusedParamError(ValueError):
    """A ``fused_params`` setting that compressed tables cannot honour (named in the message)."""


def optimizer_spec_from_fused_params(
    fused_params: Optional[Mapping[str, Any]], default: SparseOptimizerSpec
) -> SparseOptimizerSpec:
    """``default`` with the optimizer settings of ``fused_params`` applied (``default`` when there are none).

    Raises :class:`UnsupportedFusedParamError` naming the first setting that cannot be honoured.
    """
    params = dict(fused_params or {})
    if not params:
        return default
    for key in params:
        if key not in _SPEC_FIELDS and key not in NO_EFFECT_KEYS and key not in ("optimizer", "weight_decay_mode"):
            raise UnsupportedFusedParamError(
                f"fused_params[{key!r}] = {params[key]!r} is not supported by compressed tables "
                f"(supported: optimizer, {', '.join(sorted(_SPEC_FIELDS))}, weight_decay_mode)"
            )
    name = default.name
    if "optimizer" in params:
        opt = params["optimizer"]
        if isinstance(opt, str):
            opt = EmbOptimType(opt)
        if opt not in OPTIMIZER_NAMES:
            raise UnsupportedFusedParamError(
                f"fused_params['optimizer'] = {opt} is not supported by compressed tables "
                f"(supported: {', '.join(t.name for t in OPTIMIZER_NAMES)})"
            )
        name = OPTIMIZER_NAMES[opt]
    fields: Dict[str, Any] = {"name": name}
    for key, field in _SPEC_FIELDS.items():
        if key in params:
            fields[field] = float(params[key])
    if name not in _HAS_BETAS:
        for key in ("beta1", "beta2"):
            if key in params:
                raise UnsupportedFusedParamError(
                    f"fused_params[{key!r}] is set but optimizer {name} has no {key}"
                )
    mode = params.get("weight_decay_mode", WeightDecayMode.NONE)
    if isinstance(mode, str):
        mode = WeightDecayMode[mode.upper()]
    decay = params.get("weight_decay")
    if name in ("adagrad", "rowwise_adagrad"):
        # TBE's Adagrads decay only in an explicit mode; L2 (folded into the gradient) is what ours do.
        if mode not in (WeightDecayMode.NONE, WeightDecayMode.L2):
            raise UnsupportedFusedParamError(
                f"fused_params['weight_decay_mode'] = {mode} is not supported by compressed tables (L2 or NONE)"
            )
        if decay and mode != WeightDecayMode.L2:
            raise UnsupportedFusedParamError(
                f"fused_params['weight_decay'] = {decay} with weight_decay_mode {mode}: TBE would not apply "
                "it; set weight_decay_mode=WeightDecayMode.L2 (or drop weight_decay)"
            )
    elif mode != WeightDecayMode.NONE:
        raise UnsupportedFusedParamError(
            f"fused_params['weight_decay_mode'] = {mode} is not supported with optimizer {name}"
        )
    if name == "sgd" and decay:
        raise UnsupportedFusedParamError(f"fused_params['weight_decay'] = {decay}: EXACT_SGD has no weight decay")
    return dataclasses.replace(default, **fields)
