"""Losses on soft targets (the mixed, smoothed targets of ``vit_jax_fix.data.mixup_cutmix``).

* ``softmax_ce``: timm SoftTargetCrossEntropy = mean over the batch of -sum(t * log_softmax(z)) (DeiT).
* ``bce``: DeiT III's BCEWithLogits, mean over batch x classes, on binarised targets.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def loss_fn(name: str):
  if name == "softmax_ce":
    return lambda logits, targets: jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))
  if name == "bce":
    return lambda logits, targets: jnp.mean(
        optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets))
  raise ValueError(f"unknown loss {name!r}: use 'softmax_ce' or 'bce'")


def eval_metrics(logits, labels, mask):
  """Sums over the valid (mask = 1) examples: loss (plain CE), top-1 and top-5 hits, count."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  topk = jnp.argsort(-logits, axis=-1)[:, :k]
  hit1 = (topk[:, 0] == labels).astype(jnp.float32)
  hit5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  return {"loss": jnp.sum(ce * mask), "top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask),
          "count": jnp.sum(mask)}
