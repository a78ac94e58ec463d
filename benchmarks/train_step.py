"""The benchmarks' train step: cross-entropy and one optimizer update on a model's `nnx.split` state, as a pure
function to jit (speed.py and device_check.py time the same step)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def functional_train_step(graphdef, tx):
  """(params, rest, opt_state, x, y) -> (params, rest, opt_state, loss); `rest` is the non-Param state
  (BatchNorm statistics, RNG counters), updated by the forward pass."""
  def train_step(params, rest, opt_state, x, y):
    def loss_fn(p, r):
      # Merged inside the differentiated trace, so BatchNorm can update: `r` is not differentiated, so its
      # Variables would belong to the outer (jit) trace and nnx refuses to mutate them here; tree.map rebuilds
      # them in this trace (free: same arrays).
      m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))
      logits = m(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
      return loss, nnx.state(m, nnx.Not(nnx.Param))
    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss
  return train_step
