"""Work counted by XLA: the FLOPs of a model's forward pass, from the lowered (not compiled) program."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax_fix.models import layout


def xla_flops(model: nnx.Module, input_shape: tuple) -> float:
  """FLOPs of `model(x)` for x of `input_shape` (NHWC), as XLA's cost analysis counts them (every
  multiply-add of the program, softmax, norms and GELU included). Works on abstract (`nnx.eval_shape`)
  models. XLA counts the body of a loop once, so blocks that run under `jax.lax.scan` are unrolled for
  the count."""
  model = layout.with_param_layout(model, layout.PER_BLOCK)
  scanned = bool(getattr(model, "scan_blocks", False))
  if scanned:
    model.scan_blocks = False
  try:
    graphdef, state = nnx.split(model)
    lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
        state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  finally:
    if scanned:
      model.scan_blocks = True
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])
