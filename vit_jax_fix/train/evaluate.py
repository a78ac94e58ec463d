"""Evaluation over the whole eval split (padded batches, masked: every example counts exactly once), and the
DeepViT BatchNorm re-calibration."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix import data as data_lib
from vit_jax_fix.train import sharding as shard_lib


def evaluate(eval_fn, params, batch_stats, batches, mesh, prefix: str = "eval") -> dict:
  """Runs the jitted eval step over an iterator of host batches; returns {prefix/top1, /top5, /loss, /count}."""
  totals = None
  for batch in batches:
    out = eval_fn(params, batch_stats, shard_lib.global_batch(batch, mesh))
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  if totals is None or totals["count"] == 0:
    raise ValueError("the eval split is empty")
  n = totals["count"]
  return {f"{prefix}/top1": totals["top1"] / n, f"{prefix}/top5": totals["top5"] / n,
          f"{prefix}/loss": totals["loss"] / n, f"{prefix}/count": int(n)}


def make_calibration_step(model_def):
  """One batch -> the BatchNorm statistics of that batch (model in eval mode except BatchNorm, momentum 0)."""

  def calib(params, batch_stats, images):
    model = model_def.merge(params, batch_stats, train=False)
    for _, m in nnx.iter_graph(model):
      if isinstance(m, nnx.BatchNorm):
        m.use_running_average = False
        m.momentum = 0.0
    model(images)
    return model_def.stats_of(model)
  return calib


def recalibrate_batch_norm(calib_fn, params, batch_stats, batches, mesh, num_batches: int):
  """DeepViT's bn_calibration: reset the statistics and replace them by the plain average over `num_batches`
  full batches of train images with eval transforms (torch momentum=None, a cumulative average). Flax keeps
  the biased batch variance where torch keeps the unbiased one: a factor n/(n-1) per batch, negligible at the
  official 256 images."""
  acc, n = None, 0
  for batch in batches:
    if n >= num_batches:
      break
    if float(np.min(batch["mask"])) < 1.0:   # a padded tail batch would bias the statistics
      break
    g = shard_lib.global_batch({"image": batch["image"]}, mesh)
    stats = calib_fn(params, batch_stats, g["image"])
    acc = stats if acc is None else jax.tree.map(jnp.add, acc, stats)
    n += 1
  if n == 0:
    return batch_stats
  return jax.tree.map(lambda s: s / n, acc)


def calibration_batches(data_cfg, *, batch_size: int, model_defaults=None):
  """Train images with the eval transform, in file order."""
  cfg = data_lib.pipeline._resolve(data_cfg, model_defaults)  # noqa: SLF001 - same resolution as training
  cfg.eval_split = cfg.train_split
  return data_lib.build_eval_iterator(cfg, global_batch_size=batch_size, model_defaults=model_defaults)
