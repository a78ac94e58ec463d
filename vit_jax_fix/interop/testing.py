"""Helpers for parity tests: random models without paying for initialisation, and jitted logits.

`random_model(name, **overrides)` builds the model abstractly (`skeleton.filled`, nothing is compiled) and fills
every parameter with N(0, scale^2) noise (LayerNorm scales around 1), which is much faster on CPU than running
the initialisers op by op, and moves LayerScale, biases and norms far enough from their init that a wrong
conversion shows in the logits. Test helpers only: production loaders use `skeleton.skeleton`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.interop import skeleton


def random_model(name: str, *, seed: int = 0, scale: float = 0.2, **overrides) -> nnx.Module:
  rng = np.random.default_rng(seed)

  def noise(leaf, shape, dtype):
    if leaf == "var":  # BatchNorm running variance must stay positive
      return 1.0 + scale * np.abs(rng.normal(size=shape))
    return (1.0 if leaf == "scale" else 0.0) + scale * rng.normal(size=shape)

  return skeleton.filled(name, noise, seed=seed, **overrides)


@nnx.jit
def _forward(model, x):
  return model(x)


def logits(model: nnx.Module, images) -> np.ndarray:
  """Eval-mode logits of NHWC float32 images at 'highest' matmul precision (fp32 parity)."""
  model.eval()
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(model, jnp.asarray(images)))
