"""Evaluation over the whole eval split (padded batches, masked: every example counts exactly once), the
evaluators of ``config.evals``, and the DeepViT BatchNorm re-calibration.

Evaluators (``EVALUATORS``; each is the config's data with a few keys replaced, so the eval transform --
resize, crop, interpolation, mean/std -- and ``data.data_dir`` are the config's):

* ``val``: the data's own eval split.
* ``real``: ImageNet-ReaL (tfds ``imagenet2012_real``, the 50,000 validation images with the re-assessed
  label sets of Beyer et al. 2020, arXiv:2006.07159): top-1 counts a hit when the prediction is one of the
  image's real labels; images whose set is empty are left out (``num_examples`` is the rest, 46,837 on the
  full set); see ``losses.eval_metrics``.
* ``v2``: ImageNet-V2 (tfds ``imagenet_v2``, Recht et al. 2019, arXiv:1902.10811), 10,000 new test images,
  matched-frequency by default; ``v2/threshold-0.7`` and ``v2/topimages`` name the other tfds configs.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix import data as data_lib
from vit_jax_fix.train import sharding as shard_lib


EVALUATORS = {
    "val": {},
    "real": dict(dataset="imagenet2012_real", eval_split="validation", image_key="image", label_key="real_label"),
    "v2": dict(dataset="imagenet_v2", eval_split="test", image_key="image", label_key="label"),
}


# tfds imagenet_v2's configs (3.0.0); 'v2' alone is the first, the default.
V2_VARIANTS = ("matched-frequency", "threshold-0.7", "topimages")


def evaluator_names(evals) -> tuple[str, ...]:
  """config.evals as a tuple of names; an entry 'val,real' (`--config.evals=val,real`) counts as two."""
  evals = (evals,) if isinstance(evals, str) else tuple(evals or ())
  return tuple(n.strip() for entry in evals for n in str(entry).split(",") if n.strip())


def check_evals(evals) -> None:
  """config.evals: evaluator names ('val', 'real', 'v2', 'v2/<variant>'), at least one, each once."""
  from vit_jax_fix.errors import ConfigError
  names = evaluator_names(evals)
  if not names:
    raise ConfigError(f"config.evals={evals!r}: give evaluator names, e.g. --config.evals=val,real,v2 "
                      f"(known: {', '.join(EVALUATORS)}).")
  for name in names:
    base, slash, variant = name.partition("/")
    if base not in EVALUATORS or (slash and (base != "v2" or variant not in V2_VARIANTS)):
      raise ConfigError(f"config.evals: unknown evaluator {name!r}; use {', '.join(EVALUATORS)} or "
                        f"{', '.join('v2/' + v for v in V2_VARIANTS)}.")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.evals={names!r} names an evaluator twice.")


def eval_data_config(data_cfg, name: str):
  """The data config evaluator `name` reads: `data_cfg` with its dataset, split and feature keys replaced."""
  base, _, variant = name.partition("/")
  cfg = copy.deepcopy(data_cfg)
  for key, value in EVALUATORS[base].items():
    cfg[key] = value
  if variant:
    cfg.dataset = f"{cfg.dataset}/{variant}"
  return cfg


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
