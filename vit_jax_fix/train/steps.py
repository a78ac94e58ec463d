"""Pure train / eval step functions on the train-state pytree, and their sharded jit.

The step works on nested dicts; ``ModelDef.merge`` rebuilds the nnx model inside the trace, so the shardings
given to ``jax.jit`` apply leaf by leaf to the state.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from vit_jax_fix.data import mixup_cutmix
from vit_jax_fix.train import distill as distill_lib
from vit_jax_fix.train import losses
from vit_jax_fix.train import optim
from vit_jax_fix.train import sharding as shard_lib
from vit_jax_fix.train import transfer


def make_mixer(mix_kwargs: dict, mesh=None):
  """(key, images, labels) -> (images, targets). With a mesh, per device, as in the PyTorch recipes (each GPU
  mixes its own local batch): every device pairs its own images and draws its own lambda, from the key folded
  with its position on the mesh. Without one, the global batch is mixed as one batch."""

  def mix(key, images, labels):
    return mixup_cutmix(key, images, labels, **mix_kwargs)

  if mesh is None:
    return mix

  def local_mix(key, images, labels):
    return mix(jax.random.fold_in(key, jax.lax.axis_index(shard_lib.AXES)), images, labels)
  return jax.shard_map(local_mix, mesh=mesh, in_specs=(jax.P(), shard_lib.BATCH_SPEC, shard_lib.BATCH_SPEC),
                       out_specs=(shard_lib.BATCH_SPEC, shard_lib.BATCH_SPEC))


def step_keys(state):
  """(mixup key, dropout / drop-path key) of the micro-step the state is at: the run's key folded with the step
  (the recipe parity tests read the mixup lambda the step draws from it)."""
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]))


def make_train_step(model_def, tx, *, loss: str, mix_kwargs: dict, ema_decay: float, lr_schedule,
                    train_mode: bool = True, grad_accum_steps: int = 1, skip_nonfinite: bool = False,
                    nan_at_step: int = -1, mix_mesh=None, frozen: dict | None = None,
                    distill: tuple | None = None):
  """mix_mesh: mix per device (shard_map over the batch axes of that mesh); None mixes the global batch as one.
  skip_nonfinite: a step whose loss or gradient norm is NaN/inf leaves params, statistics, optimizer and
  EMA unchanged (step and data position still advance) and increments state['nonfinite_skips'].
  nan_at_step > 0 makes the loss of that (1-based) step NaN: fault injection for tests.
  frozen: `train.transfer.frozen_map` of config.optimizer.freeze: those parameters and their EMA keep their
  values bit for bit."""
  loss_of = losses.loss_fn(loss)
  # distill: (type, alpha, tau, teacher_logits(teacher_weights, images)) from `distill.step_args`: DeiT's
  # distillation loss, the teacher run on the mixed images; the step then takes the teacher's weights as its
  # third argument.
  kind, alpha, tau, teacher_logits = distill or ("none", 0.5, 1.0, None)
  loss_of = distill_lib.make_loss(loss_of, kind, alpha, tau)   # (outputs, targets, teacher logits) -> loss

  mix = make_mixer(mix_kwargs, mix_mesh)

  def train_step(state, batch, teacher=None):
    k_mix, k_drop = step_keys(state)
    images, targets = mix(k_mix, batch["image"], batch["label"])
    z_teacher = teacher_logits(teacher, images) if teacher_logits is not None else None

    def objective(params):
      model = distill_lib.training_outputs(
          model_def.merge(params, state["batch_stats"], train=train_mode, dropout_key=k_drop))
      logits = model(images)
      value = loss_of(logits, targets, z_teacher)
      if nan_at_step > 0:
        value = jnp.where(state["step"] + 1 == nan_at_step, jnp.nan, value)
      return value, model_def.stats_of(model)

    (loss_value, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = transfer.keep_frozen(frozen, optax.apply_updates(state["params"], updates), state["params"])
    did_update = optim.updated(tx, opt_state)
    ema = state["ema"]
    if ema is not None:
      new_ema = {"params": transfer.keep_frozen(frozen, optim.ema_update(ema["params"], params, ema_decay),
                                                ema["params"]),
                 "batch_stats": optim.ema_update(ema["batch_stats"], new_stats, ema_decay)}
      ema = jax.tree.map(lambda n, o: jnp.where(did_update, n, o), new_ema, ema)
    update_count = (state["step"] + 1) // grad_accum_steps
    grad_norm = optax.tree.norm(grads)
    skips = state.get("nonfinite_skips", jnp.zeros((), jnp.int32))
    if skip_nonfinite:
      finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, new_stats = keep(params, state["params"]), keep(new_stats, state["batch_stats"])
      opt_state, ema = keep(opt_state, state["opt_state"]), keep(ema, state["ema"])
      skips = skips + jnp.where(finite, 0, 1).astype(skips.dtype)
    new_state = dict(state, step=state["step"] + 1, data_position=state["data_position"] + 1, params=params,
                     batch_stats=new_stats, opt_state=opt_state, ema=ema)
    if "nonfinite_skips" in state:
      new_state["nonfinite_skips"] = skips
    metrics = {"train/loss": loss_value, "train/lr": lr_schedule(jnp.maximum(update_count - 1, 0)),
               "train/grad_norm": grad_norm}
    if skip_nonfinite:
      metrics["train/nonfinite_skips"] = skips
    return new_state, metrics
  return train_step


def make_eval_step(model_def):
  def eval_step(params, batch_stats, batch):
    model = model_def.merge(params, batch_stats, train=False)
    return losses.eval_metrics(model(batch["image"]), batch["label"], batch["mask"])
  return eval_step


def jit_train_step(fn, state_sh, mesh, teacher_sh=None):
  # teacher_sh: the shardings of a distillation teacher's weights, the step's third argument.
  rep = shard_lib.replicated(mesh)
  batch_sh = shard_lib.batch_sharding(mesh)
  in_sh = (state_sh, {"image": batch_sh, "label": batch_sh}) + ((teacher_sh,) if teacher_sh is not None else ())
  return jax.jit(fn, in_shardings=in_sh,
                 out_shardings=(state_sh, rep), donate_argnums=(0,))


def jit_eval_step(fn, params_sh, stats_sh, mesh):
  batch_sh = shard_lib.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(params_sh, stats_sh, {"image": batch_sh, "label": batch_sh, "mask": batch_sh}),
                 out_shardings=shard_lib.replicated(mesh))


