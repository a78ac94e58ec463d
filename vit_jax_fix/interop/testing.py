"""Helpers for parity tests: random models without paying for initialisation, and jitted logits.

`random_model(name, **overrides)` builds the model abstractly (`nnx.eval_shape`, nothing is compiled) and fills
every parameter with N(0, scale^2) noise (LayerNorm scales around 1), which is much faster on CPU than running
the initialisers op by op, and moves LayerScale, biases and norms far enough from their init that a wrong
conversion shows in the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models.registry import create_model


def random_model(name: str, *, seed: int = 0, scale: float = 0.2, **overrides) -> nnx.Module:
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: create_model(name, **overrides))
  state = nnx.state(model)

  def fill(path, x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return np.zeros(x.shape, x.dtype)
    last = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
    if last == "var":  # BatchNorm running variance must stay positive
      return (1.0 + scale * np.abs(rng.normal(size=x.shape))).astype(x.dtype)
    base = 1.0 if last == "scale" else 0.0
    return (base + scale * rng.normal(size=x.shape)).astype(x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
  model.spec_name = name
  return model


@nnx.jit
def _forward(model, x):
  return model(x)


def logits(model: nnx.Module, images) -> np.ndarray:
  """Eval-mode logits of NHWC float32 images at 'highest' matmul precision (fp32 parity)."""
  model.eval()
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(model, jnp.asarray(images)))
