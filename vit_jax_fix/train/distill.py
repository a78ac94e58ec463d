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

The teacher is any registered model (`distillation.teacher`, with `teacher_overrides`), frozen: evaluation
mode (BatchNorm running statistics, no dropout; a distilled teacher averages its heads), no gradient. Its
weights (`teacher_weights`): '' the zoo's released file (`interop.weights.released`), a PyTorch / npz file or a
trainer workdir / checkpoint (`finetune.read_weights`, key layout `teacher_layout`), or 'random' (random init;
smoke tests only). `Teacher` holds its weights as device arrays sharded by the run's parameter rules; the train
step receives them as its third argument (not in the train state: checkpoints and resume are unchanged).
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


class Teacher:
  """A frozen teacher: its ModelDef, the shardings of its weights ({'params', 'batch_stats'}, by the run's
  parameter rules), and the weights themselves, read on first use (`weights()`)."""

  def __init__(self, config, num_classes: int, mesh):
    from vit_jax_fix.train import sharding as shard_lib, state as state_lib
    d = config.distillation
    self.config, self.mesh = config, mesh
    kw = dict(d.teacher_overrides)
    kw.setdefault("num_classes", int(num_classes))
    kw.setdefault("img_size", int(config.data.image_size))
    try:
      self.model_def = state_lib.ModelDef.create(d.teacher, **kw)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.distillation.teacher {d.teacher!r} with {kw} cannot be built: {e}") from None
    abstract = {"params": self.model_def.abstract_params(), "batch_stats": self.model_def.abstract_stats()}
    self.shardings = shard_lib.state_shardings(abstract, mesh, config)
    self._weights = None

  def weights(self) -> dict:
    """{'params', 'batch_stats'} on the devices: the configured file (or the zoo's, or random init)."""
    if self._weights is None:
      from vit_jax_fix.train import finetune
      d = self.config.distillation
      params, stats = jax.jit(self.model_def.init, static_argnums=0)(int(self.config.seed) + 17)
      if d.teacher_weights != "random":
        path, layout = d.teacher_weights, d.teacher_layout
        if not path:
          from vit_jax_fix.interop.weights import released
          path, layout = released(d.teacher)
        src_p, src_s = finetune.read_weights(path, self.model_def, layout=layout, ema=False)
        params, stats = finetune.fit_weights(self.model_def, params, stats, src_p, src_s, reinit_head=False,
                                             source=f"distillation teacher {d.teacher} ({path})")
      self._weights = jax.device_put({"params": params, "batch_stats": stats}, self.shardings)
    return self._weights

  def logits(self, weights, images):
    """Evaluation-mode logits, without gradient (called inside the train step)."""
    model = self.model_def.merge(weights["params"], weights["batch_stats"], train=False)
    return jax.lax.stop_gradient(model(images))


def teacher_of(config, num_classes: int, mesh) -> Teacher | None:
  """The run's teacher; None when config.distillation.type is 'none'."""
  return None if config.distillation.type == "none" else Teacher(config, num_classes, mesh)


def step_args(config, teacher: Teacher | None) -> tuple | None:
  """`steps.make_train_step(distill=...)`: (type, alpha, tau, teacher logits function), or None."""
  d = config.distillation
  if teacher is None:
    return None
  return (d.type, float(d.alpha), float(d.tau), teacher.logits)
