"""`train_and_evaluate(config, workdir)`: the whole run as one library call (main.py, notebooks and tests).

`Setup` is everything static about a run (the checked config, mesh, model, optimizer, shardings, one compiled
train step per EViT keep rate). `train_and_evaluate` tells the run: open the workdir's checkpoints and restore
the newest (or start fresh, fine-tuned when configured), then per micro-step train, log, evaluate, diagnose and
checkpoint, with `monitor.TrainMonitor` checking every step for NaN/inf and averaging the log window; finally
announce the last evaluation.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple

import jax
import numpy as np

from vit_jax_fix import data as data_lib
from vit_jax_fix import errors
from vit_jax_fix import paths
from vit_jax_fix.models import keep_rate as keep_rate_lib
from vit_jax_fix.models import registry
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import teacher as teacher_lib
from vit_jax_fix.train import collapse
from vit_jax_fix.train import config as config_lib
from vit_jax_fix.train import evaluate as eval_lib
from vit_jax_fix.train import finetune
from vit_jax_fix.train import metrics as metrics_lib
from vit_jax_fix.train import monitor as monitor_lib
from vit_jax_fix.train import optim
from vit_jax_fix.train import sharding as shard_lib
from vit_jax_fix.train import state as state_lib
from vit_jax_fix.train import steps as steps_lib
from vit_jax_fix.train import transfer


NonFiniteLossError = monitor_lib.NonFiniteLossError
ConfigError = errors.ConfigError   # a config that cannot train on this data / these devices


def _dataset_info(config):
  try:
    return data_lib.dataset_info(config.data)
  except data_lib.DataSourceError:
    raise
  except ValueError as e:
    if "num_classes" in str(e):
      raise ConfigError(f"{e} Fix: leave data.num_classes unset (read from the dataset) or set it to at least "
                        "the dataset's class count.") from None
    raise


def _report_empty_class_folders(data_cfg) -> int:
  """Image folders: class directories without any image become classes nobody trains on; say so (count)."""
  if data_cfg.dataset != "folder" or not data_cfg.get("folder"):
    return 0
  empty = data_lib.empty_class_folders(data_cfg.folder)
  if empty:
    msg = (f"image folder {data_cfg.folder!r}: {len(empty)} empty class folder(s) {empty[:10]}; they stay classes "
           f"of the head (labels keep their order) but have no examples")
    logging.warning(msg)
    print(f"WARNING: {msg}", flush=True)
  return len(empty)


def _check_num_classes(config, ds_classes: int):
  n = config.model.overrides.get("num_classes") if hasattr(config.model.overrides, "get") else None
  if n is not None and int(n) < ds_classes:
    raise ConfigError(f"config.model.overrides.num_classes={n} but the dataset has {ds_classes} classes: labels "
                      f"would fall outside the head. Fix: remove model.overrides.num_classes (it is filled from "
                      f"the data) or set it to {ds_classes}.")


def _check_batch(config, mesh, micro_batch: int):
  n = mesh.size
  for what, b in (("batch_size", micro_batch), ("eval_batch_size", int(config.eval_batch_size) or micro_batch)):
    if b % n:
      per = "batch_size / optimizer.grad_accum_steps" if what == "batch_size" and config.optimizer.grad_accum_steps > 1 \
          else what
      raise ConfigError(f"config.{per} = {b} is not divisible by the {n} devices of the mesh {dict(mesh.shape)}: "
                        f"the batch is split evenly over every device. Fix: --config.{what}="
                        f"{max(n, b // n * n) if what == 'eval_batch_size' else max(n, b // n * n) * int(config.optimizer.grad_accum_steps)} "
                        f"(a multiple of {n}), or run on fewer devices (mesh.data / JAX_NUM_CPU_DEVICES).")


def _keep_rate_schedule(config, model_def, steps_per_epoch: int) -> keep_rate_lib.KeepRateSchedule | None:
  """config.keep_rate_schedule for this model (None when off): epochs become updates, the base is the one keep
  rate < 1 the model was built with."""
  krs = config.keep_rate_schedule
  if not krs.enabled:
    return None
  rates = sorted({r for r in model_def.configured_keep_rates() if r < 1.0})
  if len(rates) != 1:
    raise ConfigError(
        f"config.keep_rate_schedule.enabled needs an EViT model with one keep rate < 1 in its reorganising "
        f"blocks; {model_def.name} {model_def.kwargs} has {rates or 'none'}. Fix: set "
        f"model.overrides.keep_rate (and keep_rate_blocks), or --config.keep_rate_schedule.enabled=False.")
  return keep_rate_lib.KeepRateSchedule(rates[0], round(float(krs.start_epochs) * steps_per_epoch),
                                        round(float(krs.ramp_epochs) * steps_per_epoch), float(krs.granularity))


class Setup:
  """Everything static about a run: mesh, model, optimizer, step counts, shardings, jitted functions."""

  def __init__(self, config, mesh=None):
    config_lib.validate(config)
    self.config = config
    if mesh is None:
      try:
        mesh = shard_lib.mesh_from_config(config)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    self.mesh = mesh
    self.accum = int(config.optimizer.grad_accum_steps)
    self.micro_batch = int(config.batch_size) // self.accum
    _check_batch(config, self.mesh, self.micro_batch)
    self.num_classes, self.num_train = _dataset_info(config)
    self.empty_class_folders = _report_empty_class_folders(config.data)
    _check_num_classes(config, self.num_classes)
    self.model_defaults = registry.model_defaults(config.model.name)
    try:
      self.model_def = state_lib.ModelDef.create(
          config.model.name, **state_lib.model_kwargs(config, self.num_classes, config.data.image_size))
    except errors.UserError:
      raise
    except (ValueError, TypeError, AssertionError) as e:
      raise ConfigError(f"config.model ({config.model.name!r}, overrides {dict(config.model.overrides)}) cannot "
                        f"be built: {e}. Fix the value in config.model.overrides.") from None
    self.steps_per_epoch = config_lib.steps_per_epoch(config, self.num_train)
    self.total_updates = config_lib.total_steps(config, self.num_train)
    self.total_iters = self.total_updates * self.accum
    self.tx, self.lr = optim.make_optimizer(config, self.model_def.abstract_params(), self.total_updates,
                                            self.steps_per_epoch)
    self.ema = float(config.ema.decay) > 0
    self.init_fn = functools.partial(state_lib.init_train_state, self.model_def, self.tx, int(config.seed),
                                     self.ema)
    self.abstract_state = jax.eval_shape(self.init_fn)
    self.state_sh = shard_lib.state_shardings(self.abstract_state, self.mesh, config)
    self.teacher = teacher_lib.teacher_of(config, self.num_classes, self.mesh)   # None without distillation
    self._step_kwargs = dict(
        loss=config.loss, mix_kwargs=data_lib.mixup_kwargs(config.data, self.num_classes),
        ema_decay=float(config.ema.decay), lr_schedule=self.lr, train_mode=bool(config.train_mode),
        grad_accum_steps=self.accum, skip_nonfinite=config.nonfinite_policy == "skip",
        nan_at_step=int(config.debug_nan_at_step), distill=teacher_lib.step_args(config, self.teacher),
        mix_mesh=self.mesh if config.data.mixup_per_device else None,
        frozen=transfer.frozen_map(self.model_def.abstract_params(), config.optimizer.freeze)
        if config.optimizer.freeze else None)
    self.keep_rate = _keep_rate_schedule(config, self.model_def, self.steps_per_epoch)
    # keep rate (None: as configured) -> its jitted train step
    self.train_programs = keep_rate_lib.CompiledByKeepRate(
        self._build_train_step, jit=functools.partial(
            steps_lib.jit_train_step, state_sh=self.state_sh, mesh=self.mesh,
            teacher_sh=self.teacher.shardings if self.teacher is not None else None))
    self.eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(self.model_def), self.state_sh["params"],
                                             self.state_sh["batch_stats"], self.mesh)

  def keep_rate_at(self, step: int) -> float | None:
    """The EViT keep rate of micro-step `step` (None without a schedule: the model's configured rates)."""
    return None if self.keep_rate is None else self.keep_rate(step // self.accum)

  def _build_train_step(self, keep_rate: float | None):
    model_def = self.model_def
    if keep_rate is not None:
      model_def = model_def.with_keep_rate(keep_rate)
      logging.info("EViT keep rate %s: compiling its train step (%d of at most %d programs)", keep_rate,
                   len(self.train_programs.programs) + 1, self.keep_rate.max_programs)
    return steps_lib.make_train_step(model_def, self.tx, **self._step_kwargs)

  def train_step(self, state, batch, *, keep_rate: float | None = None):
    """One jitted micro-step; one compiled program per distinct keep rate, built on first use."""
    teacher = (self.teacher.weights(),) if self.teacher is not None else ()
    return self.train_programs.program(keep_rate)(state, batch, *teacher)

  def init_state(self):
    """Fresh state, created directly in its shardings (never on one device first)."""
    return jax.jit(self.init_fn, out_shardings=self.state_sh)()

  def abstract_with_shardings(self):
    return ckpt.abstract_like(self.abstract_state, self.state_sh)

  def meta(self) -> dict:
    return ckpt.model_meta(self.model_def.name, self.model_def.kwargs, num_classes=self.num_classes,
                           image_size=int(self.config.data.image_size), has_ema=self.ema,
                           layout=self.model_def.param_layout)

  def train_batches(self, start_step: int):
    return data_lib.build_train_iterator(self.config.data, global_batch_size=self.micro_batch,
                                         seed=int(self.config.seed), start_step=start_step,
                                         model_defaults=self.model_defaults)

  def eval_batches(self, data_cfg=None):
    """The padded eval batches of `data_cfg` (default: the config's data; the evaluate command passes the
    data config of another evaluator, e.g. ImageNet-ReaL)."""
    bs = int(self.config.eval_batch_size) or self.micro_batch
    return data_lib.build_eval_iterator(self.config.data if data_cfg is None else data_cfg, global_batch_size=bs,
                                        model_defaults=self.model_defaults)

  def recalibrate_batch_norm(self, params, batch_stats):
    """DeepViT's BatchNorm re-calibration before an evaluation (config.bn_recalibration): new statistics for
    `params`, placed in the state's shardings; `batch_stats` unchanged when it is off or there is no BN."""
    c = self.config
    if not c.bn_recalibration.enabled or not jax.tree.leaves(batch_stats):
      return batch_stats
    calib = jax.jit(eval_lib.make_calibration_step(self.model_def),
                    in_shardings=(self.state_sh["params"], self.state_sh["batch_stats"],
                                  shard_lib.batch_sharding(self.mesh)),
                    out_shardings=self.state_sh["batch_stats"])
    batches = eval_lib.calibration_batches(c.data, batch_size=int(c.bn_recalibration.batch_size),
                                           model_defaults=self.model_defaults)
    stats = eval_lib.recalibrate_batch_norm(calib, params, batch_stats, batches, self.mesh,
                                            int(c.bn_recalibration.num_batches))
    return jax.device_put(stats, self.state_sh["batch_stats"])


def _finetune_init(setup, state):
  params, stats = jax.device_get((state["params"], state["batch_stats"]))
  params, stats = finetune.load_pretrained(setup.config, setup.model_def, params, stats)
  state = dict(state, params=jax.device_put(params, setup.state_sh["params"]),
               batch_stats=jax.device_put(stats, setup.state_sh["batch_stats"]))
  if state["ema"] is not None:
    # Own buffers for the EMA: the train step donates both trees, and device_put of one array may alias it.
    params, stats = jax.tree.map(np.array, jax.device_get((params, stats)))
    state["ema"] = {"params": jax.device_put(params, setup.state_sh["ema"]["params"]),
                    "batch_stats": jax.device_put(stats, setup.state_sh["ema"]["batch_stats"])}
  return state


def run_eval(setup, state, writer, step: int) -> tuple[dict, dict]:
  """Evaluates the model (and its EMA); DeepViT re-calibrates BatchNorm first when configured. Returns
  (metrics, state) -- the calibrated statistics are stored in the state, as the official code does."""
  c = setup.config
  if c.bn_recalibration.enabled:
    state = dict(state, batch_stats=setup.recalibrate_batch_norm(state["params"], state["batch_stats"]))
  out = eval_lib.evaluate(setup.eval_step, state["params"], state["batch_stats"], setup.eval_batches(),
                          setup.mesh, "eval")
  if state["ema"] is not None and c.ema.evaluate:
    out.update(eval_lib.evaluate(setup.eval_step, state["ema"]["params"], state["ema"]["batch_stats"],
                                 setup.eval_batches(), setup.mesh, "eval_ema"))
  writer.write_scalars(step, out)
  return out, state


def _progress(setup, initial: int):
  if jax.process_index() != 0 or not setup.config.progress_bar:
    return None
  from tqdm import tqdm
  return tqdm(total=setup.total_iters, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def train_and_evaluate(config, workdir: str, *, mesh=None) -> dict:
  """Trains with checkpoint/resume and periodic evaluation; returns the final eval metrics.

  Restarting on the same workdir resumes from the latest checkpoint (parameters, optimizer, EMA, RNG and
  data position), so an interrupted run ends bit-identical to an uninterrupted one; a finished workdir is not
  trained again.
  """
  workdir = paths.as_path(workdir)      # local or gs://: every workdir file goes through epath
  setup = Setup(config, mesh)
  mngr, state, latest = _open_checkpoints(setup, workdir)
  writer = metrics_lib.MetricWriter(workdir)
  if latest is not None:
    logging.info("restored step %d from %s", latest, ckpt.checkpoint_dir(workdir))
  else:
    state = _fresh_state(setup)
  step = int(jax.device_get(state["step"]))
  if step >= setup.total_iters:
    final = _final_eval_of_finished_run(setup, state, writer, step)
    _announce(final, already=True)
    mngr.close()
    writer.close()
    return final
  with ckpt.PreemptionFlag() as preempted:
    try:
      final = _train(setup, state, step, workdir, latest, mngr, writer, preempted)
    finally:
      mngr.wait_until_finished()
      mngr.close()
      writer.close()
  if "preempted_at" not in final:
    _announce(final)
  return final


def _open_checkpoints(setup, workdir: str):
  """(manager, state, step) of the newest good checkpoint in `workdir` (state and step None: none yet), after
  checking that the workdir's saved config trains the same run; the config is saved next to them."""
  c = setup.config
  ckpt.check_config_matches(workdir, c)
  workdir.mkdir(parents=True, exist_ok=True)      # before the manager, as it always was (Orbax expects the root)
  make_manager = functools.partial(ckpt.manager, workdir, max_to_keep=int(c.max_to_keep) or None)
  mngr, state, latest = ckpt.restore_latest_good(workdir, make_manager, setup.abstract_with_shardings(),
                                                 model=f"{setup.model_def.name} {setup.model_def.kwargs}")
  if jax.process_index() == 0:
    ckpt.save_config(workdir, c)
  return mngr, state, latest


def _fresh_state(setup):
  """The state of step 0: initialised, then the pretrained weights of config.init_from when given."""
  state = setup.init_state()
  if setup.config.init_from.path or setup.config.init_from.get("pretrained", False):
    state = _finetune_init(setup, state)
  return state


def _final_eval_of_finished_run(setup, state, writer, step: int) -> dict:
  """A finished workdir: its final evaluation as logged in metrics.jsonl, or evaluated again when missing."""
  rows = [r for r in metrics_lib.read_jsonl(writer.path) if "eval/top1" in r and r["step"] == setup.total_iters]
  if rows:
    return {k: v for k, v in rows[-1].items() if k.startswith("eval")}
  return run_eval(setup, state, writer, step)[0]


class _Due(NamedTuple):
  """What happens after micro-step `step`: the last step, a checkpoint, an evaluation, a log row."""
  last: bool
  save: bool
  evaluate: bool
  log: bool

  @classmethod
  def at(cls, setup, step: int, preempted) -> "_Due":
    c = setup.config
    last = step == setup.total_iters
    eval_every = setup.steps_per_epoch * setup.accum if c.eval_every_steps < 0 else int(c.eval_every_steps)
    return cls(last=last,
               save=last or step % max(1, int(c.checkpoint_every_steps)) == 0 or bool(preempted),
               evaluate=last or (eval_every > 0 and step % eval_every == 0),
               log=step % max(1, int(c.log_every_steps)) == 0 or last)


def _train(setup, state, step: int, workdir: str, latest, mngr, writer, preempted) -> dict:
  """The steps from `step` to the end: train, log, evaluate, diagnose, checkpoint. Returns the last
  evaluation, or {'preempted_at': step} after saving on SIGTERM."""
  c = setup.config
  collapse_diag = collapse.TrainingDiagnostics(setup, workdir) if c.diagnostics.every_steps else None
  if collapse_diag is not None and step == 0:
    collapse_diag(0, state, writer)       # the model at init: where collapse starts from
  batches = setup.train_batches(int(jax.device_get(state["data_position"])))
  bar = _progress(setup, step)
  monitor = monitor_lib.TrainMonitor(
      checkpoint_dir=ckpt.checkpoint_dir(workdir), last_good=latest,
      skip_nonfinite=c.nonfinite_policy == "skip", max_skips=c.nonfinite_max_skips,
      images_per_step=setup.micro_batch, steps_per_epoch=setup.steps_per_epoch * setup.accum)
  final = None
  try:
    while step < setup.total_iters:
      state, metrics = _train_step(setup, state, next(batches), step)
      step += 1
      monitor.record(metrics, step)
      _debug_faults(c, step)
      due = _Due.at(setup, step, preempted.reached())   # every process: the same step (PreemptionFlag)
      if due.save or due.evaluate or due.log:
        monitor.settle()                   # never evaluate or save a state from a non-finite step
      if due.log:
        _log(monitor, writer, bar, step)
      if bar is not None:
        bar.update(1)
      if due.evaluate:
        final, state = _evaluate(setup, state, writer, bar, step)
      if collapse_diag is not None:
        collapse_diag(step, state, writer)
      if due.save:
        _save(mngr, writer, step, state, setup.meta())
        monitor.saved(step)
      if preempted and not due.last:
        return _preempted(mngr, step)
  finally:
    if bar is not None:
      bar.close()
  return final


def _train_step(setup, state, batch, step: int):
  """One micro-step on the host batch `batch`, at the scheduled EViT keep rate (logged as train/keep_rate)."""
  rate = setup.keep_rate_at(step)
  state, metrics = setup.train_step(state, shard_lib.global_batch(batch, setup.mesh), keep_rate=rate)
  if rate is not None:
    metrics = dict(metrics, **{"train/keep_rate": rate})
  return state, metrics


def _debug_faults(c, step: int) -> None:
  """Fault injection for tests (config.debug_*): a slow step, a crash after a given step."""
  if c.debug_step_sleep:
    time.sleep(float(c.debug_step_sleep))
  if step == int(c.debug_crash_at_step):
    raise RuntimeError(f"debug_crash_at_step: injected crash in the train step at step {step}")


def _log(monitor, writer, bar, step: int) -> None:
  row = monitor.row(step)
  if row is None:
    return
  writer.write_scalars(step, row)
  if bar is not None:
    bar.set_postfix({"loss": f"{row['train/loss']:.4f}", "img/s": f"{row['train/images_per_sec']:.0f}"})


def _evaluate(setup, state, writer, bar, step: int) -> tuple[dict, dict]:
  final, state = run_eval(setup, state, writer, step)
  if bar is not None:
    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)))
  return final, state


def _save(mngr, writer, step: int, state, meta: dict) -> None:
  """Starts the (async) checkpoint of `step`. Logs how long it held the training loop: copying the arrays off
  the devices, plus waiting for the previous save still being written (a slow bucket shows here)."""
  start = time.perf_counter()
  ckpt.save(mngr, step, state, meta, force=True)
  blocked = time.perf_counter() - start
  logging.info("checkpoint of step %d: the save blocked training for %.3f s", step, blocked)
  writer.write_scalars(step, {"checkpoint/blocking_s": blocked})


def _preempted(mngr, step: int) -> dict:
  mngr.wait_until_finished()
  logging.warning("SIGTERM: saved step %d, exiting; rerun the same command to resume", step)
  print(f"preempted: checkpoint saved at step {step}; rerun the same command to resume", flush=True)
  return {"preempted_at": step}


def _announce(final: dict, already: bool = False):
  if jax.process_index() != 0 or not final:
    return
  extra = f", EMA {final['eval_ema/top1']:.4f}" if "eval_ema/top1" in final else ""
  prefix = "run already finished; " if already else ""
  print(f"{prefix}final eval top-1: {final['eval/top1']:.4f} (top-5 {final.get('eval/top5', float('nan')):.4f}"
        f"{extra})", flush=True)
