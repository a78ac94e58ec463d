"""Orbax checkpoints of the whole train state, restored onto any mesh, and `load_model` for other tools.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``; ``meta`` (JSON) holds the model name and constructor
arguments, so a checkpoint alone is enough to rebuild the model.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, max_to_keep: int | None = 2, save_interval_steps: int = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=max(1, save_interval_steps),
                                      enable_async_checkpointing=not read_only, read_only=read_only,
                                      create=not read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts, item_names=ITEMS)


def save(mngr, step: int, state, meta: dict, *, force: bool = False) -> bool:
  return mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr, step: int, abstract_state):
  """Restores `state` at `step` into the shardings carried by `abstract_state` (any mesh)."""
  out = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return out["state"]


def read_meta(mngr, step: int) -> dict:
  return dict(mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _locate(path: str):
  """(checkpoints dir root workdir, step) from a workdir, its checkpoints dir or one step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return path, None
  if os.path.basename(path) == "checkpoints":
    return os.path.dirname(path), None
  parent = os.path.dirname(path)
  if os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit():
    return os.path.dirname(parent), int(os.path.basename(path))
  raise FileNotFoundError(f"no checkpoint found at {path!r}: give a workdir, its 'checkpoints' folder, or "
                          f"one step folder inside it.")


def load_state_dicts(path: str, *, ema: bool = False):
  """(meta, params, batch_stats) as host numpy nested dicts from a workdir or checkpoint path."""
  import numpy as np
  workdir, step = _locate(path)
  mngr = manager(workdir, max_to_keep=None, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)!r}")
  meta = read_meta(mngr, step)
  from vit_jax_fix.train.state import ModelDef
  model_def = ModelDef.create(meta["model_name"], **meta["model_kwargs"])
  rep = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), t)
  trees = {"params": sds(model_def.abstract_params()), "batch_stats": sds(model_def.abstract_stats())}
  if ema and not meta.get("has_ema", False):
    raise ValueError(f"checkpoint {path!r} holds no EMA weights (ema.decay was 0)")
  target = {"ema": trees} if ema else trees
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=rep, global_shape=x.shape, dtype=x.dtype),
                              target)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))["state"]
  out = out["ema"] if ema else out
  mngr.close()
  to_np = lambda t: jax.tree.map(np.asarray, t)
  return meta, model_def, to_np(out["params"]), to_np(out["batch_stats"])


def load_model(path_or_workdir: str, name: str | None = None, ema: bool = False):
  """An eval-mode nnx model from a trainer checkpoint (the latest step of a workdir, or one step dir).
  `name`, when given, must match the model name stored with the checkpoint."""
  meta, model_def, params, stats = load_state_dicts(path_or_workdir, ema=ema)
  if name is not None and name != meta["model_name"]:
    raise ValueError(f"checkpoint holds {meta['model_name']!r}, not {name!r}")
  return model_def.model(params, stats, train=False)


class PreemptionFlag:
  """Turns SIGTERM into a flag the loop polls: it then saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.flag = threading.Event()
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def __bool__(self):
    return self.flag.is_set()


def save_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "config.py.txt"), "w") as f:
    f.write(str(config))


def dump_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
