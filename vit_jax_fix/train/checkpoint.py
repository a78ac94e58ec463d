"""Orbax checkpoints of the whole train state, restored onto any mesh, and `load_model` for other tools.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``; ``meta`` (JSON) holds the model name and constructor
arguments, so a checkpoint alone is enough to rebuild the model.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax_fix import errors
from vit_jax_fix import paths
from vit_jax_fix.models import layout as param_layout
from vit_jax_fix.train import config as config_lib

ITEMS = ("state", "meta")
QUARANTINE = "corrupt_checkpoints"
log = logging.getLogger(__name__)


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose arrays do not fit the configured model / train state (names the keys and shapes)."""


class NoUsableCheckpointError(errors.UserError, RuntimeError):
  """Every checkpoint of a workdir failed to restore."""


class ConfigMismatchError(errors.UsageError, ValueError):
  """A workdir written by a run with a different training config."""


def checkpoint_dir(workdir) -> epath.Path:
  return paths.as_path(workdir) / "checkpoints"


def manager(workdir, *, max_to_keep: int | None = 2, save_interval_steps: int = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=max(1, save_interval_steps),
                                      enable_async_checkpointing=not read_only, read_only=read_only,
                                      create=not read_only, cleanup_tmp_directories=not read_only)
  return _Manager(checkpoint_dir(workdir), options=opts, item_names=ITEMS)


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


def _plain(tree):
  """JSON values: numpy scalars become Python numbers, tuples lists, other objects (a dtype) their str."""
  return json.loads(json.dumps(tree, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def model_meta(name: str, model_kwargs: dict, *, num_classes: int, image_size: int, has_ema: bool = False,
               layout: str | None = None, source: str | None = None) -> dict:
  """The 'meta' item of every checkpoint (the training loop's and `save_model`'s): what rebuilds the model
  (registered name, constructor overrides, `param_layout` of the stored blocks; None for models without the
  option) and what feeds it (num_classes, image_size, the registry's preprocessing), whether the state holds
  EMA weights, and for an imported checkpoint the file it was converted from (`source`)."""
  from vit_jax_fix.models import registry
  meta = {"model_name": name, "model_kwargs": _plain(dict(model_kwargs)), "has_ema": bool(has_ema),
          "param_layout": layout, "num_classes": int(num_classes), "image_size": int(image_size),
          "preprocessing": _plain(registry.model_defaults(name))}
  if source is not None:
    meta["source"] = str(source)
  return meta


def _locate(path):
  """(checkpoints dir root workdir, step) from a workdir, its checkpoints dir or one step dir."""
  path = paths.as_path(path)
  if (path / "checkpoints").is_dir():
    return path, None
  if path.name == "checkpoints":
    return path.parent, None
  if path.parent.name == "checkpoints" and path.name.isdigit():
    return path.parent.parent, int(path.name)
  raise errors.MissingFileError(f"no checkpoint found at {str(path)!r}: give a workdir, its 'checkpoints' folder, "
                                f"or one step folder inside it.")


def load_state_dicts(path: str, *, ema: bool = False):
  """(meta, model_def, params, batch_stats) from a workdir or checkpoint path: params and batch_stats as
  host numpy nested dicts in the per-block layout, whatever layout the checkpoint stores (meta
  'param_layout'; checkpoints without it store blocks per block)."""
  import numpy as np
  workdir, step = _locate(path)
  mngr = manager(workdir, max_to_keep=None, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise errors.MissingFileError(f"no checkpoint under {str(checkpoint_dir(workdir))!r}")
  meta = read_meta(mngr, step)
  from vit_jax_fix.train.state import ModelDef
  model_def = ModelDef.create(meta["model_name"], param_layout=meta.get("param_layout") or "per_block",
                              **meta["model_kwargs"])
  rep = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), t)
  trees = {"params": sds(model_def.abstract_params()), "batch_stats": sds(model_def.abstract_stats())}
  if ema and not meta.get("has_ema", False):
    raise errors.UsageError(f"checkpoint {path!r} holds no EMA weights (ema.decay was 0)")
  target = {"ema": trees} if ema else trees
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=rep, global_shape=x.shape, dtype=x.dtype),
                              target)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))["state"]
  out = out["ema"] if ema else out
  mngr.close()
  to_np = lambda t: model_def.per_block(jax.tree.map(np.asarray, t))
  return meta, model_def, to_np(out["params"]), to_np(out["batch_stats"])


def load_model(path_or_workdir: str, name: str | None = None, ema: bool = False):
  """An eval-mode nnx model from a trainer checkpoint (the latest step of a workdir, or one step dir).
  `name`, when given, must match the model name stored with the checkpoint."""
  meta, model_def, params, stats = load_state_dicts(path_or_workdir, ema=ema)
  if name is not None and name != meta["model_name"]:
    raise CheckpointMismatchError(f"checkpoint holds {meta['model_name']!r}, not {name!r}")
  return model_def.model(params, stats, train=False)


def model_trees(model) -> dict:
  """{'params', 'batch_stats'} of a model as host numpy nested dicts (nnx.Param, and every other non-RNG
  variable), the trees a checkpoint's 'state' stores; blocks as the model stores them."""
  from flax import nnx
  _, params, _, stats = nnx.split(model, nnx.Param, nnx.RngState, ...)
  to_np = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))
  return {"params": to_np(params), "batch_stats": to_np(stats)}


def save_model(model, out_dir: str, *, name: str, overrides: dict | None = None, step: int = 0,
               source: str = "") -> str:
  """Write `model` (built as `create_model(name, **overrides)`, e.g. loaded from PyTorch or npz weights) as a
  trainer checkpoint `<out_dir>/checkpoints/<step>/{state,meta}`: 'state' is `model_trees` with the blocks per
  block, 'meta' is `model_meta` without EMA. `load_model(out_dir)` and `config.init_from.path =
  out_dir` read it (`python -m vit_jax_fix.convert from-torch`). Returns the step directory."""
  from vit_jax_fix.interop.timm_models import full_kwargs
  overrides = {k: v for k, v in dict(overrides or {}).items() if k != "param_layout"}
  model = param_layout.with_param_layout(model, param_layout.PER_BLOCK)
  kw = full_kwargs(name, **overrides)
  img = kw.get("img_size", 224)
  meta = model_meta(name, overrides, num_classes=int(kw.get("num_classes", 0)),
                    image_size=int(img[0] if isinstance(img, (list, tuple)) else img),
                    layout=param_layout.layout_of(model), source=source)
  mngr = manager(out_dir, max_to_keep=None)
  try:
    save(mngr, step, model_trees(model), meta, force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return str(checkpoint_dir(out_dir) / str(step))


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own preemption poll: `save` would call jax's `reached_preemption_sync_point`
  with the step number, while `PreemptionFlag` polls it with its own counter; one poller keeps the protocol's
  counters meaningful."""

  def reached_preemption(self, step: int) -> bool:
    return False


class PreemptionFlag:
  """A preemption notice (SIGTERM) turned into one step at which every process saves and exits.

  The loop calls `reached()` once after every step, on every process, and saves and stops when it is True.
  * One process: SIGTERM sets a flag; `reached()` reads it.
  * Several processes (jax.distributed): a flag per host would let hosts stop at different steps, and the
    save, a collective, would wait for hosts still stepping. jax.distributed.initialize installs jax's
    preemption sync manager, which catches SIGTERM itself: the coordination service tells every host, each
    reports its count of `reached()` calls, and the sync point is the largest count + 1, which every host
    reaches since they step in lockstep. `reached()` is then a local check (about 2 us); the agreement runs in
    jax's background threads. The count starts at 0 on every host when the process starts (all hosts resume
    from the same checkpoint), so a notice during set-up, before the first step, stops at the first one.
  """

  def __init__(self):
    self.flag = threading.Event()
    self._old = None
    self._calls = 0
    self._agreed = jax.process_count() > 1 and _preemption_sync_available()

  def __enter__(self):
    if not self._agreed and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def reached(self) -> bool:
    """True at the step to save and stop at (the same step on every process); call once per step."""
    if not self._agreed:
      return self.flag.is_set()
    from jax.experimental import multihost_utils
    self._calls += 1
    if multihost_utils.reached_preemption_sync_point(self._calls):
      self.flag.set()
    return self.flag.is_set()

  def __bool__(self):
    return self.flag.is_set()


def _preemption_sync_available() -> bool:
  """jax's preemption sync manager runs (jax.distributed initialised with jax_enable_preemption_service)."""
  from jax.experimental import multihost_utils
  try:
    multihost_utils.reached_preemption_sync_point(0)   # the count every host starts from: changes nothing
  except RuntimeError:
    log.warning("jax's preemption service is off (jax_enable_preemption_service): each process reacts to "
                "SIGTERM alone, and processes may stop at different steps")
    return False
  return True


def _atomic_write(path: epath.Path, text: str) -> None:
  """Readers see the old file or the new one, never a torn one. Locally: write a temporary file, then rename it
  over (atomic on POSIX). On object stores (gs://, s3://) one object write is already all-or-nothing, and a
  'rename' is a copy plus a delete: write the object directly."""
  if paths.is_uri(path):
    path.write_text(text)
    return
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)


def save_config(workdir, config) -> None:
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _atomic_write(workdir / "config.json", config.to_json_best_effort(indent=2))
  _atomic_write(workdir / "config.py.txt", str(config))


# Keys that may change between a run and its resumption: they do not change what is trained (bookkeeping,
# where the data lives, how the state is laid out on devices -- checkpoints restore onto any mesh).
RESUMABLE_KEYS = ("debug_", "progress_bar", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                  "max_to_keep", "eval_batch_size", "mesh.", "sharding.", "init_from.", "data.data_dir",
                  "data.folder", "data.prefetch", "data.cache", "nonfinite_policy", "nonfinite_max_skips", "evals")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, config) -> list[str]:
  """'key: saved -> now' for every trajectory-changing key that differs (RESUMABLE_KEYS excluded). A key the
  saved config lacks was added to base_config after that run was written: it counts as base_config's default,
  which a new key keeps equal to the behaviour before it existed (e.g. schedule.step_per = 'update')."""
  now = _flatten(json.loads(config.to_json_best_effort()))
  before = dict(_flatten(json.loads(config_lib.base_config().to_json_best_effort())), **_flatten(saved))
  diffs = []
  for key in sorted(set(now) | set(before)):
    if key.startswith(RESUMABLE_KEYS) or key in RESUMABLE_KEYS:
      continue
    a, b = before.get(key, "<absent>"), now.get(key, "<absent>")
    if a != b:
      diffs.append(f"{key}: {a!r} in the workdir, {b!r} now")
  return diffs


def check_config_matches(workdir, config) -> None:
  """Refuses to resume a workdir whose saved config.json trains something else (ConfigMismatchError)."""
  path = paths.as_path(workdir) / "config.json"
  if not path.is_file() or not checkpoint_dir(workdir).is_dir():
    return
  saved = json.loads(path.read_text())
  diffs = config_differences(saved, config)
  if diffs:
    shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
    raise ConfigMismatchError(
        f"refusing to resume {str(workdir)!r}: it holds checkpoints of a run with a different config, and resuming "
        f"would mix two trainings. Differences (saved in {path}):\n  {shown}\nUse a new --workdir for the new "
        f"config, or rerun with the workdir's values (e.g. --config.<key>=<saved value>). To fine-tune from "
        f"this run instead, set --config.init_from.path={workdir} with a new --workdir.")


# ------------------------------------------------------------------------------------- checkpoint integrity


def _shape_table(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  from vit_jax_fix.train.sharding import path_str
  return {path_str(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


def saved_shapes(step_dir) -> dict:
  """{'params/blocks/0/attn/qkv/kernel': shape, ...} of a step's saved state, from Orbax's metadata only."""
  md = ocp.StandardCheckpointer().metadata(epath.Path(step_dir) / "state")
  return _shape_table(md.item_metadata.tree)


def shape_mismatches(expected: dict, found: dict, groups=("params", "batch_stats", "ema")) -> list[str]:
  """Lines naming every leaf missing, unexpected or of another shape (within `groups`, the model trees)."""
  pick = lambda t: {k: v for k, v in t.items() if k.split("/")[0] in groups}
  expected, found = pick(expected), pick(found)
  out = []
  for k in sorted(set(expected) | set(found)):
    if k not in found:
      out.append(f"{k}: missing from the checkpoint (model expects {expected[k]})")
    elif k not in expected:
      out.append(f"{k}: in the checkpoint {found[k]}, not in the model")
    elif tuple(expected[k]) != tuple(found[k]):
      out.append(f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}")
  return out


def format_mismatch(source: str, lines: list[str], model: str, hint: str) -> str:
  shown = "\n  ".join(lines[:25]) + (f"\n  ... and {len(lines) - 25} more" if len(lines) > 25 else "")
  return (f"{source} does not fit the configured model {model}: {len(lines)} mismatched key(s):\n  {shown}\n"
          f"{hint}")


def quarantine(workdir, step: int) -> epath.Path:
  """Moves a bad step directory to <workdir>/corrupt_checkpoints/<step>-<time> (kept for inspection)."""
  src = checkpoint_dir(workdir) / str(step)
  dst_root = paths.as_path(workdir) / QUARANTINE
  dst_root.mkdir(parents=True, exist_ok=True)
  return src.rename(dst_root / f"{step}-{int(time.time())}")


def restore_latest_good(workdir: str, make_manager, abstract_state, *, model: str = ""):
  """(manager, state or None, step or None): the newest checkpoint that restores completely.

  Unfinished saves (Orbax's *.orbax-checkpoint-tmp-* directories, left by a kill during a save) are never
  listed as steps. A listed step that fails to restore (truncated or corrupted files, missing items) is
  logged as a warning naming its directory, moved to <workdir>/corrupt_checkpoints/, and the previous step
  is tried. A checkpoint of another model or shape raises CheckpointMismatchError listing the keys; when
  checkpoints exist but none restores, NoUsableCheckpointError.
  """
  mngr = make_manager()
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return mngr, None, None
  expected = _shape_table(abstract_state)
  bad = []
  for step in steps:
    step_dir = checkpoint_dir(workdir) / str(step)
    try:
      found = saved_shapes(step_dir)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: treat the step as corrupt
      found, err = None, e
    if found is not None:
      lines = shape_mismatches(expected, found)
      if lines:
        mngr.close()
        layout = param_layout.layout_of_paths(found)
        if layout != param_layout.layout_of_paths(expected):
          hint = (f"The checkpoint stores the blocks in the other parameter layout ({layout!r}; checkpoints "
                  f"written before the stacked layout store them per block): resume it with "
                  f"--config.model.overrides.param_layout={layout}.")
        else:
          hint = ("This workdir belongs to another model or shape: use a new --workdir, or set "
                  f"--config.init_from.path={workdir} to fine-tune from it (head re-initialised, pos_embed "
                  "resized).")
        raise CheckpointMismatchError(format_mismatch(f"checkpoint {step_dir}", lines, model, hint))
      try:
        return mngr, restore(mngr, step, abstract_state), step
      except Exception as e:  # noqa: BLE001 - any read failure means "this step is unusable"
        err = e
    msg = (f"checkpoint {step_dir} is unreadable or incomplete ({type(err).__name__}: "
           f"{str(err).splitlines()[0][:300] if str(err) else ''}); skipping it")
    log.warning(msg)
    print(f"WARNING: {msg}", flush=True)
    bad.append(str(step_dir))
    if jax.process_index() == 0:
      moved = quarantine(workdir, step)
      log.warning("moved %s to %s", step_dir, moved)
    mngr.close()
    mngr = make_manager()
  mngr.close()
  raise NoUsableCheckpointError(
      f"none of the {len(bad)} checkpoint(s) in {checkpoint_dir(workdir)} could be restored: {bad} (moved to "
      f"{paths.as_path(workdir) / QUARANTINE}). Start again with a new --workdir, or rerun this "
      f"command to train from scratch in this workdir.")


def dump_json(path, obj) -> None:
  epath.Path(path).write_text(json.dumps(obj, indent=2))
