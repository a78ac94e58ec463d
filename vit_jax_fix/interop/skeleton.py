"""A model to load weights into, built without running its initialisers.

`filled(name, value, **overrides)` builds `create_model(name, **overrides)` abstractly (`nnx.eval_shape`:
nothing is allocated or compiled) and sets every floating-point variable to `value(leaf, shape, dtype)` (leaf:
the variable's attribute name, e.g. 'kernel', 'scale', 'var'), integer variables to zero and RNG keys to
`jax.random.key(seed)`. On CPU this is much faster than running the initialisers op by op.

`skeleton(name, **overrides)` is what the loaders use when the weights overwrite every parameter
(`checkpoint_io.load_torch(strict=True)`, `npz.load_npz`): zeros, except norm scales and BatchNorm running
variances, which are one, so that the model is well defined even before loading. Tests fill random values
through the same function (`interop.testing.random_model`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models.registry import create_model

ONE = ("scale", "var")   # LayerNorm / BatchNorm scales and BatchNorm running variances


def filled(name: str, value: Callable[[str, tuple, np.dtype], np.ndarray], *, seed: int = 0,
           **overrides) -> nnx.Module:
  model = nnx.eval_shape(lambda: create_model(name, **overrides))

  def fill(path, x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return np.zeros(x.shape, x.dtype)
    leaf = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
    return np.asarray(value(leaf, x.shape, x.dtype)).astype(x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
  model.spec_name = name
  return model


def _neutral(leaf: str, shape: tuple, dtype) -> np.ndarray:
  return np.full(shape, 1.0 if leaf in ONE else 0.0, dtype)


def skeleton(name: str, **overrides) -> nnx.Module:
  """`create_model(name, **overrides)` with zeros (ones for norm scales and BN variances), for loading."""
  return filled(name, _neutral, **overrides)
