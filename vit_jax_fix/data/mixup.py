"""Mixup / CutMix on device, in pure JAX (jittable), with timm's ``Mixup`` batch-mode semantics.

One draw per batch (call it per device, e.g. inside ``shard_map``, to get DeiT's per-GPU behaviour):

* with probability ``prob`` the batch is mixed, else it is left as is (lambda = 1);
* if both alphas are > 0, CutMix is chosen with probability ``switch_prob``, else Mixup;
  lambda ~ Beta(alpha, alpha) of the chosen method;
* Mixup: ``x = lam * x + (1 - lam) * x[::-1]``;
* CutMix: a box of side ``sqrt(1 - lam)`` times the image side, centred uniformly (clipped to the image),
  is pasted from ``x[::-1]``; lambda is then corrected to the area actually kept (timm ``correct_lam``);
* targets: ``lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y[::-1]))`` with
  ``smooth(t) = t * (1 - s) + s / num_classes`` (timm's on/off values);
* ``bce_targets=True`` (DeiT III): the mixed hard targets are binarised, ``1[target > 0]``, so both mixed
  classes become 1. DeiT III trains with label smoothing 0; smoothing before binarising would turn every class
  on, so that combination is refused.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0, dtype=jnp.float32):
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) * (on - off) + off


def cutmix_box(rng, lam, height: int, width: int):
  """timm rand_bbox: returns (y0, y1, x0, x1) int32 for a box of area ~ (1 - lam) * H * W."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def sample_params(rng, mixup_alpha, cutmix_alpha, switch_prob, prob):
  """Returns (lam, use_cutmix) for one batch, as timm Mixup._params_per_batch.

  The hyper-parameters may be traced scalars, so one compiled function serves every setting.
  """
  k_apply, k_switch, k_gamma = jax.random.split(rng, 3)
  mix_on, cut_on = mixup_alpha > 0, cutmix_alpha > 0
  # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a): one gamma draw for both methods (compiles once).
  alphas = jnp.maximum(jnp.stack([mixup_alpha, mixup_alpha, cutmix_alpha, cutmix_alpha]), 1e-3)
  g = jax.random.gamma(k_gamma, alphas.astype(jnp.float32))

  def ratio(a, b):
    return jnp.where(a + b > 0, a / jnp.maximum(a + b, 1e-30), 0.5)
  lam_mix, lam_cut = ratio(g[0], g[1]), ratio(g[2], g[3])
  use_cutmix = jnp.where(mix_on & cut_on, jax.random.uniform(k_switch) < switch_prob, cut_on)
  apply = (jax.random.uniform(k_apply) < prob) & (mix_on | cut_on)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  return jnp.where(apply, lam, 1.0).astype(jnp.float32), use_cutmix & apply


def mixup_cutmix(rng, images, labels, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1,
                 bce_targets: bool = False):
  """Mixes a batch (NHWC images, int labels) and returns (images, targets [B, num_classes] float32)."""
  if bce_targets and not isinstance(label_smoothing, jax.core.Tracer) and label_smoothing > 0:
    raise ValueError(
        f"bce_targets=True with label_smoothing={label_smoothing}: binarising smoothed targets sets every class "
        "to 1. DeiT III's BCE recipe uses label_smoothing=0.0; set data.label_smoothing=0.0.")
  hparams = jnp.asarray([mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing], jnp.float32)
  return _mixup_cutmix(rng, images, labels, hparams, num_classes=int(num_classes), bce_targets=bool(bce_targets))


@functools.partial(jax.jit, static_argnames=("num_classes", "bce_targets"))
def _mixup_cutmix(rng, images, labels, hparams, *, num_classes, bce_targets):
  mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing = (hparams[i] for i in range(5))
  k_params, k_box = jax.random.split(rng)
  lam, use_cutmix = sample_params(k_params, mixup_alpha, cutmix_alpha, switch_prob, prob)
  flipped = images[::-1]
  height, width = images.shape[1], images.shape[2]

  # CutMix: paste the box from the flipped batch, then set lam to the area actually kept.
  y0, y1, x0, x1 = cutmix_box(k_box, lam, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut_images = jnp.where(in_box[None, :, :, None], flipped, images)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / float(height * width)

  lam_b = lam.astype(images.dtype)
  mix_images = images * lam_b + flipped * (1 - lam_b)
  out = jnp.where(use_cutmix, cut_images, mix_images)
  lam = jnp.where(use_cutmix, lam_cut, lam)

  smoothing = 0.0 if bce_targets else label_smoothing
  t1 = smooth_one_hot(labels, num_classes, smoothing)
  t2 = smooth_one_hot(labels[::-1], num_classes, smoothing)
  targets = t1 * lam + t2 * (1.0 - lam)
  if bce_targets:
    targets = (targets > 0).astype(jnp.float32)
  return out, targets
