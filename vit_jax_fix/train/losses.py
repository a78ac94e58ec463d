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
  """Sums over the valid (mask = 1) examples: loss (plain CE), top-1 and top-5 hits, count.

  labels [B] are class indices; labels [B, C] are multi-hot label sets (ImageNet-ReaL, Beyer et al. 2020,
  arXiv:2006.07159): a prediction is a top-1 hit when the arg-max class is in the example's set, a top-5 hit
  when any of the 5 best is; an example with an empty set is left out (not counted); the loss is the cross
  entropy against the uniform distribution over the set."""
  logits = logits.astype(jnp.float32)
  if labels.ndim == 2:
    return _multi_label_metrics(logits, labels.astype(jnp.float32), mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  topk = jnp.argsort(-logits, axis=-1)[:, :k]
  hit1 = (topk[:, 0] == labels).astype(jnp.float32)
  hit5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  return {"loss": jnp.sum(ce * mask), "top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask),
          "count": jnp.sum(mask)}


def _multi_label_metrics(logits, multi_hot, mask):
  size = jnp.sum(multi_hot, axis=-1)
  mask = mask * (size > 0)
  k = min(5, logits.shape[-1])
  topk = jnp.argsort(-logits, axis=-1)[:, :k]
  in_set = jnp.take_along_axis(multi_hot, topk, axis=-1) > 0
  ce = optax.softmax_cross_entropy(logits, multi_hot / jnp.maximum(size, 1.0)[:, None])
  return {"loss": jnp.sum(ce * mask), "top1": jnp.sum(in_set[:, 0] * mask), "top5": jnp.sum(jnp.any(in_set, -1) * mask),
          "count": jnp.sum(mask)}
