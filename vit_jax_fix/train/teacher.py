"""The frozen teacher of DeiT distillation (the loss is `train/distill.py`).

The teacher is any registered model (`config.distillation.teacher`, with `teacher_overrides`), frozen: evaluation
mode (BatchNorm running statistics, no dropout; a distilled teacher averages its heads), no gradient. Its
weights (`teacher_weights`): '' the zoo's released file (`interop.weights.released`), a PyTorch / npz file or a
trainer workdir / checkpoint (`finetune.read_weights`, key layout `teacher_layout`), or 'random' (random init;
smoke tests only). `Teacher` holds its weights as device arrays sharded by the run's parameter rules; the train
step receives them as its third argument (not in the train state: checkpoints and resume are unchanged).
"""
from __future__ import annotations

import jax

from vit_jax_fix.errors import ConfigError


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
