"""Knowledge distillation as DeiT trains it (Touvron et al. 2021; facebookresearch/deit `losses.DistillationLoss`).

With student outputs (z_cls, z_dist) -- a distilled model (`dist_token=True`) in training mode -- soft targets
t (the mixed, smoothed targets), teacher logits z_T on the same (mixed) images, weight alpha and temperature tau:

    base  = base_loss(z_cls, t)                       (the config's loss: soft-target CE or BCE)
    'none': loss = base
    'soft': D = tau^2 / (B C) * sum_{b,c} p_T (log p_T - log p_S),  p_T = softmax(z_T / tau), p_S = softmax(z_dist / tau)
            (torch kl_div(log p_S, log p_T, reduction='sum', log_target=True) * tau^2 / numel, as DeiT)
    'hard': D = mean_b CE(z_dist, argmax_c z_T)
    loss  = (1 - alpha) base + alpha D

A model with one head (CaiT, a plain DeiT) is distilled through its class token: z_dist = z_cls. (DeiT's class
raises for a single output; CaiT's paper trains its class token with DeiT's hard distillation.)

The teacher (`train/teacher.py`) runs on the same mixed images as the student, frozen.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vit_jax_fix.errors import ConfigError

TYPES = ("none", "soft", "hard")


def check(config) -> None:
  """config.distillation's values (ConfigError naming the key)."""
  d = config.distillation
  if d.type not in TYPES:
    raise ConfigError(f"config.distillation.type={d.type!r}: use one of {TYPES}.")
  if d.type == "none":
    return
  if not 0.0 <= d.alpha <= 1.0:
    raise ConfigError(f"config.distillation.alpha={d.alpha} must be in [0, 1].")
  if not d.tau > 0:
    raise ConfigError(f"config.distillation.tau={d.tau} must be > 0.")
  if not d.teacher:
    raise ConfigError("config.distillation.teacher is empty: name the teacher model (e.g. 'regnety_160').")
  from vit_jax_fix.models import registry
  spec = registry.get_spec(d.teacher)
  registry.check_overrides(spec.builder, dict(d.teacher_overrides),
                           f"config.distillation.teacher_overrides ({spec.name})")
  if not d.teacher_weights and spec.weights is None:
    raise ConfigError(f"config.distillation.teacher={d.teacher!r} has no released weights: set "
                      f"config.distillation.teacher_weights to a weights file or trainer workdir.")


def split_outputs(outputs):
  """(z_cls, z_dist) of a student's training-mode outputs; one array is both."""
  if isinstance(outputs, (tuple, list)):
    return outputs[0], outputs[1]
  return outputs, outputs


def distillation_term(kind: str, student_dist, teacher_logits, tau: float):
  """D of the module docstring (float32)."""
  s = student_dist.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  if kind == "soft":
    log_ps = jax.nn.log_softmax(s / tau, axis=-1)
    log_pt = jax.nn.log_softmax(t / tau, axis=-1)
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps)) * (tau * tau) / s.size
  if kind == "hard":
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, jnp.argmax(t, axis=-1)))
  raise ValueError(f"distillation type {kind!r}: use 'soft' or 'hard'")


def make_loss(base_loss, kind: str = "none", alpha: float = 0.5, tau: float = 1.0):
  """(outputs, targets, teacher_logits) -> loss, DeiT's DistillationLoss around `base_loss(logits, targets)`."""
  def loss(outputs, targets, teacher_logits=None):
    z_cls, z_dist = split_outputs(outputs)
    base = base_loss(z_cls, targets)
    if kind == "none":
      return base
    return base * (1.0 - alpha) + distillation_term(kind, z_dist, teacher_logits, tau) * alpha
  return loss


def training_outputs(model):
  """The student as the train step runs it: a distilled model returns both heads' logits even when
  config.train_mode=False has put it in evaluation mode (dropout off), where it would average them. Only the
  model's own switch changes; its Dropout / BatchNorm keep theirs."""
  if getattr(model, "head_dist", None) is not None:
    model.deterministic = False
  return model
