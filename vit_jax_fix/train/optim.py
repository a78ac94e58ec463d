"""Optimizers and schedules, built only from optax pieces.

* schedule, a function of the optimizer update count u (E updates per epoch, peak = 5e-4 x batch / 512 for
  DeiT), by ``schedule.step_per``:

  - ``'epoch'`` (the paper recipes): the learning rate the official DeiT main.py trains each epoch at. It
    builds timm's ``CosineLRScheduler(t_initial=T epochs, lr_min, warmup_t=W, warmup_lr_init=l0)`` (cosine
    from epoch 0 with the warm-up overriding the first W epochs, ``warmup_prefix=False``), whose constructor
    sets the rate to l0, and calls ``step(epoch)`` *after* each epoch, so epoch e trains at the scheduler's
    value for t = max(e - 1, 0) (epochs 0 and 1 both at l0):

        v(t) = l0 + t (peak - l0) / W                                    t < W
             = lr_min + (peak - lr_min) (1 + cos(pi t / T)) / 2          W <= t < T
             = lr_min                                                    t >= T (past the one cycle)
        lr(u) = v(max(floor(u / E) - 1, 0))

    constant within an epoch (without warm-up epoch 0 trains at the base rate, v(0) again). T = num_epochs (or
    total_steps / E), W = warmup_epochs (or warmup_steps / E).
  - ``'epoch_timm'`` (DeepViT, AugViT: timm's train.py): the same v(t), but that loop calls
    ``step(epoch + 1)`` after each epoch, so epoch e trains at v(e): lr(u) = v(floor(u / E)).
  - ``'update'``: ``optax.warmup_cosine_decay_schedule`` -- linear warm-up from ``warmup_init_lr`` over the
    warm-up updates, then cosine to ``min_lr`` at the last update of the cosine: the smooth per-update form.

  ``schedule.cooldown_epochs`` C (timm's ``cooldown_epochs``; DeepViT and AugViT train 300 + 10): the run is
  C epochs longer than the cosine, and those epochs train at ``min_lr`` (v(t) = lr_min for t >= T above).
* AdamW: ``optax.adamw`` with a weight-decay mask (the DeiT/timm exemptions: every 1-D parameter -- biases,
  norms, LayerScale gammas, FeatScale gains -- plus ``pos_embed``, ``cls_token``, ``dist_token``).
* LAMB (DeiT III, apex FusedLAMB): Adam moments, decoupled weight decay and the trust ratio applied to the
  decayed parameters only (``optax.masked(optax.scale_by_trust_ratio())``), global-norm clipping first.
* ``optax.clip_by_global_norm`` when ``clip_grad_norm > 0``; ``optax.MultiSteps`` for gradient accumulation.
* EMA of the parameters: ``optax.incremental_update`` (timm ModelEma), applied after each real update.
* Layer-wise learning-rate decay and freezing by regex (fine-tuning, linear probes): ``train.transfer``.

Stacked blocks (``block_stacks/...``, a leading block axis) are treated as the blocks they hold: the decay
mask looks at one block's rank, and the trust ratio is computed per block (``blockwise``), so the update
is the one of the per-block layout.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from vit_jax_fix.models import layout
from vit_jax_fix.train import config as config_lib
from vit_jax_fix.train import transfer


def schedule(config, total_updates: int, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of each optimizer update (`config.schedule.step_per`, see the module docstring)."""
  s = config.schedule
  peak = config_lib.peak_lr(config)
  config_lib.check_step_per(s.step_per)
  # The cosine ends before the cooldown epochs (total_updates counts them: config.total_steps).
  cosine_updates = max(total_updates - config_lib.cooldown_updates(config, steps_per_epoch), 1)
  if s.step_per in ("epoch", "epoch_timm"):
    warmup = s.warmup_steps / steps_per_epoch if s.warmup_steps > 0 else float(s.warmup_epochs)
    return per_epoch_cosine(peak, warmup_init_lr=float(s.warmup_init_lr), warmup_epochs=warmup,
                            epochs=cosine_updates / steps_per_epoch, min_lr=float(s.min_lr),
                            steps_per_epoch=steps_per_epoch, lag=1 if s.step_per == "epoch" else 0)
  warmup = int(s.warmup_steps) if s.warmup_steps > 0 else int(round(s.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(cosine_updates - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=float(s.warmup_init_lr) if warmup else peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(cosine_updates, warmup + 1), end_value=float(s.min_lr))


def per_epoch_cosine(peak: float, *, warmup_init_lr: float, warmup_epochs: float, epochs: float, min_lr: float,
                     steps_per_epoch: int, lag: int = 1) -> optax.Schedule:
  """timm's cosine stepped after each epoch: update u trains at v(t), t = max(u // steps_per_epoch - lag, 0);
  lag 1 as DeiT's main.py steps it, 0 as timm's train.py does (module docstring)."""
  slope = (peak - warmup_init_lr) / warmup_epochs if warmup_epochs > 0 else 0.0

  def lr(count):
    t = jnp.maximum(jnp.asarray(count) // steps_per_epoch - lag, 0).astype(jnp.float32)
    # (1 + cos x) / 2 = cos(x / 2)^2: the same value, without float32 cancellation near the end of the cycle.
    cosine = min_lr + (peak - min_lr) * jnp.square(jnp.cos((jnp.pi / 2) * (t / epochs)))
    value = jnp.where(t < epochs, cosine, min_lr)
    if warmup_epochs > 0:
      value = jnp.where(t < warmup_epochs, warmup_init_lr + t * slope, value)
    return value
  return lr


def decay_mask(params, exempt=("pos_embed", "cls_token", "dist_token")):
  """True for parameters that get weight decay: ndim > 1 (per block) and no name in `exempt` (regexes)."""
  pats = [re.compile(p) for p in exempt]

  def decide(path, x):
    name = layout.path_str(path)
    return bool(x.ndim - layout.is_stacked_path(path) > 1 and not any(p.search(name) for p in pats))
  return jax.tree.map_with_path(decide, params)


def blockwise(transform: optax.GradientTransformation) -> optax.GradientTransformation:
  """A stateless per-leaf transform (e.g. the trust ratio) applied to each block of a stacked leaf
  separately (jax.vmap over the block axis), to other leaves as is."""

  def update_fn(updates, state, params=None):
    def one(path, u, p):
      f = lambda u, p: transform.update(u, transform.init(p), p)[0]
      return layout.map_blocks(f, path, u, p)
    return jax.tree.map_with_path(one, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(config, params, total_updates: int, steps_per_epoch: int):
  """Returns (tx, lr_schedule). `params` may be abstract (only shapes and names are read)."""
  o = config.optimizer
  lr = schedule(config, total_updates, steps_per_epoch)
  mask = decay_mask(params, tuple(o.wd_exempt))
  parts = []
  if o.clip_grad_norm and o.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(o.clip_grad_norm)))
  if o.name == "adamw":
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask))
  else:  # lamb, apex FusedLAMB semantics: trust ratio only where weight decay applies
    parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
              optax.add_decayed_weights(o.weight_decay, mask=mask),
              optax.masked(blockwise(optax.scale_by_trust_ratio()), mask),
              optax.scale_by_learning_rate(lr)]
  tx = optax.chain(*parts)
  # Layer-wise lr decay and freezing (train.transfer); off by default, so tx is then unchanged.
  tx = transfer.wrap(tx, params, layer_decay=float(o.layer_decay), freeze=str(o.freeze))
  if int(o.grad_accum_steps) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.grad_accum_steps))
  return tx, lr


def updated(tx, opt_state):
  """Whether the last `tx.update` applied an update (False on MultiSteps' accumulation-only steps)."""
  if isinstance(tx, optax.MultiSteps):
    return tx.has_updated(opt_state)
  return True


def ema_update(ema, new, decay: float):
  return optax.incremental_update(new, ema, step_size=1.0 - decay)
