"""The model as pure pytrees, and the train state as ONE pytree (what Orbax saves is what resume needs).

``ModelDef`` holds the static halves of ``nnx.split`` (a train-mode and an eval-mode graphdef) and
converts between nnx States and plain nested dicts. The train state is a dict::

    step           int32   micro-steps done (= optimizer updates x grad_accum_steps)
    data_position  int32   train batches consumed: the input iterator restarts here (start_step)
    rng            uint32[2]  base key; step k uses fold_in(rng, k) for mixup and dropout / drop-path
    params         nnx.Param leaves as a nested dict, blocks in ``ModelDef.param_layout``: 'stacked' (the
                   default where the model has the option) keeps each scan segment's blocks as one leaf per
                   parameter name with a leading axis ('block_stacks/j/...'); ``ModelDef.model`` and
                   ``per_block`` give the per-block layout ('blocks/i/...') that interop reads
    batch_stats    every model variable that is neither a Param nor RNG state (BatchNorm statistics)
    opt_state      optax state
    ema            {'params', 'batch_stats'} or None when ema.decay == 0
    nonfinite_skips int32  updates dropped for a NaN/inf loss or gradient (nonfinite_policy='skip')

The model's own RNG streams are not state: they are reseeded from ``fold_in(rng, step)`` inside every step,
so a resumed run draws the same dropout masks as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax_fix.models import layout, registry



def model_kwargs(config, num_classes: int | None = None, image_size: int | None = None) -> dict:
  kw = dict(config.model.overrides)
  if num_classes is not None:
    kw.setdefault("num_classes", int(num_classes))
  if image_size is not None:
    kw.setdefault("img_size", int(image_size))
  return kw


def _copy(state):
  return jax.tree.map(lambda x: x, state)


@dataclasses.dataclass
class ModelDef:
  """Static description of a model: graphdefs and abstract states, no arrays.

  `kwargs` are the user's constructor overrides; `param_layout` is how the train state stores the blocks
  ('stacked' unless the overrides say otherwise or blocks are not scanned; None for families without the
  option), recorded in checkpoint metadata next to the kwargs."""
  name: str
  kwargs: dict
  graphdef_train: Any
  graphdef_eval: Any
  params_tmpl: Any        # abstract nnx.State templates
  stats_tmpl: Any
  rng_tmpl: Any
  param_layout: str | None = None
  stack_sizes: tuple = ()

  @classmethod
  def create(cls, name: str, *, param_layout: str | None = None, **kwargs) -> "ModelDef":
    """param_layout: None picks 'stacked' where possible; kwargs['param_layout'] (a model override) wins."""
    build = dict(kwargs)
    chosen = layout.resolve(registry.get_spec(name).builder, build, param_layout)
    if chosen is not None:
      build["param_layout"] = chosen
    abstract = nnx.eval_shape(lambda: registry.create_model(name, **build))
    abstract.train()
    g_train, p, r, s = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
    abstract.eval()
    g_eval = nnx.split(abstract, nnx.Param, nnx.RngState, ...)[0]
    return cls(name, dict(kwargs), g_train, g_eval, p, s, r, chosen, layout.stack_sizes(abstract))

  def _build_kwargs(self) -> dict:
    return dict(self.kwargs, param_layout=self.param_layout) if self.param_layout else dict(self.kwargs)

  def per_block(self, tree: dict) -> dict:
    """A params / batch_stats nested dict in the per-block layout (unchanged if it already is)."""
    return layout.tree_in_layout(tree, layout.PER_BLOCK, self.stack_sizes)

  def train_layout(self, tree: dict) -> dict:
    """A params / batch_stats nested dict (either layout) in this ModelDef's layout."""
    return layout.tree_in_layout(tree, self.param_layout, self.stack_sizes)

  def with_keep_rate(self, rate: float) -> "ModelDef":
    """The same model whose train graphdef runs EViT at keep rate `rate` in its reorganising blocks (the
    official runtime keep rate; `keep_rate.set_keep_rate`). The keep rate is static, so this is another
    program; the eval graphdef keeps the configured rates."""
    from vit_jax_fix.models import keep_rate as keep_rate_lib
    abstract = nnx.merge(self.graphdef_train, _copy(self.params_tmpl), _copy(self.rng_tmpl),
                         _copy(self.stats_tmpl))
    keep_rate_lib.set_keep_rate(abstract, rate)
    return dataclasses.replace(self, graphdef_train=nnx.split(abstract, nnx.Param, nnx.RngState, ...)[0])

  def configured_keep_rates(self) -> tuple[float, ...]:
    from vit_jax_fix.models import keep_rate as keep_rate_lib
    abstract = nnx.merge(self.graphdef_eval, _copy(self.params_tmpl), _copy(self.rng_tmpl),
                         _copy(self.stats_tmpl))
    try:
      return keep_rate_lib.configured_keep_rates(abstract)
    except TypeError:    # not a VisionTransformer (Shunted): no EViT blocks
      return ()

  def abstract_params(self):
    return nnx.to_pure_dict(self.params_tmpl)

  def abstract_stats(self):
    return nnx.to_pure_dict(self.stats_tmpl)

  def init(self, seed: int):
    """(params, batch_stats) as nested dicts, freshly initialised (call under jax.jit)."""
    model = registry.create_model(self.name, seed=seed, **self._build_kwargs())
    _, p, _, s = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(s)

  def merge(self, params, batch_stats, *, train: bool, dropout_key=None):
    """An nnx model from nested dicts (inside jit). Its RNG streams are reseeded from `dropout_key`."""
    p, s, r = _copy(self.params_tmpl), _copy(self.stats_tmpl), _copy(self.rng_tmpl)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, batch_stats)
    model = nnx.merge(self.graphdef_train if train else self.graphdef_eval, p, r, s)
    if jax.tree.leaves(r):
      # 'match_shape': a stacked block's streams carry one key per block (split from the drawn key).
      nnx.reseed(model, dropout=dropout_key if dropout_key is not None else jax.random.key(0),
                 policy="match_shape")
    return model

  def stats_of(self, model):
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, nnx.RngState, ...)[3])

  def model(self, params, batch_stats, *, train: bool = False):
    """A concrete nnx model outside jit (for diagnostics, export, notebooks), in the per-block layout;
    params and batch_stats may come in either layout."""
    m = self.merge(self.train_layout(params), self.train_layout(batch_stats), train=train)
    m.train() if train else m.eval()
    return layout.with_param_layout(m, layout.PER_BLOCK)


def init_train_state(model_def: ModelDef, tx, seed: int, ema: bool):
  """The full train state (call under jax.jit with out_shardings so it is created sharded)."""
  params, stats = model_def.init(seed)
  return {
      "step": jnp.zeros((), jnp.int32),
      "data_position": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed + 2)),
      "params": params,
      "batch_stats": stats,
      "opt_state": tx.init(params),
      "ema": {"params": params, "batch_stats": stats} if ema else None,
      "nonfinite_skips": jnp.zeros((), jnp.int32),
  }
