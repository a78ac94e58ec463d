"""Watching a training run from the host: the non-finite check and the metric log window.

Fetched one step late. `record(metrics, step)` keeps the newest step's metrics (still on the device) pending
and checks the previous step's, so the host never waits on the step it has just dispatched. `settle()` checks
the pending step too; the loop calls it before anything reads the state (a log row, an evaluation, a
checkpoint), so no state from a non-finite step is ever evaluated or saved.

Non-finite check (config.nonfinite_policy). A step whose train/loss or train/grad_norm is NaN or inf
  * 'stop': raises `NonFiniteLossError` naming the step, the learning rate and the last good checkpoint (the
    newest one saved from finite training, told to the monitor by `saved(step)`; rerunning resumes there);
  * 'skip': the train step has left the state unchanged and counted it in train/nonfinite_skips; the monitor
    warns, leaves the non-finite values out of the window, and raises `NonFiniteLossError` once more than
    config.nonfinite_max_skips updates were skipped.

Log window. `row(step)` turns the checked steps since the last row into one row of metrics.jsonl: the mean of
every metric over the steps that have it, except train/nonfinite_skips (a running count: its newest value),
plus train/images_per_sec (micro-batch images of the window's steps per second of wall time since the last
row) and train/epoch (micro-steps / micro-steps per epoch); None when no step was checked since.
"""
from __future__ import annotations

import logging
import math
import time

from etils import epath
import numpy as np

from vit_jax_fix import errors


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """NaN/inf loss or gradients with nonfinite_policy='stop' (or too many skipped updates with 'skip')."""


class TrainMonitor:
  """The host-side view of the train steps: one late non-finite check per step and the log window."""

  def __init__(self, *, checkpoint_dir: str, last_good: int | None, skip_nonfinite: bool, max_skips: int,
               images_per_step: int, steps_per_epoch: int):
    """last_good: the step of the newest checkpoint from finite training (None: none yet); images_per_step:
    the micro-batch; steps_per_epoch: micro-steps per epoch."""
    self.checkpoint_dir, self.last_good = checkpoint_dir, last_good
    self.skip_nonfinite, self.max_skips = skip_nonfinite, max_skips
    self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
    self._pending = None              # (metrics, step) of the newest step, not yet fetched
    self._window, self._t_window, self._n_window = [], time.time(), 0

  def record(self, metrics: dict, step: int) -> None:
    """The metrics of (1-based) step `step`, as the train step returned them; checks the previous step's."""
    if self._pending is not None:
      self._window.append(self.check(*self._pending))
    self._pending = (metrics, step)
    self._n_window += 1

  def settle(self) -> None:
    """Checks the pending step: call before the state is logged, evaluated or saved."""
    if self._pending is not None:
      self._window.append(self.check(*self._pending))
      self._pending = None

  def saved(self, step: int) -> None:
    """A checkpoint of a checked (finite) step was written."""
    self.last_good = step

  def good_checkpoint(self) -> str:
    if self.last_good is None:
      return "none yet (the run would restart from scratch)"
    return f"step {self.last_good} at {epath.Path(self.checkpoint_dir) / str(self.last_good)}"

  def check(self, metrics: dict, at: int) -> dict:
    """Host floats of one step's metrics, without its non-finite values ('skip'); raises per the policy."""
    row = {k: float(v) for k, v in metrics.items()}
    bad = [k for k in ("train/loss", "train/grad_norm") if not math.isfinite(row[k])]
    if not bad:
      return row
    what = ", ".join(f"{k} = {row[k]}" for k in bad)
    if self.skip_nonfinite:
      n = int(row.get("train/nonfinite_skips", 0))
      logging.warning("non-finite %s at step %d: update skipped (%d skipped so far)", what, at, n)
      print(f"WARNING: non-finite {what} at step {at}: update skipped ({n} skipped so far)", flush=True)
      if n > int(self.max_skips):
        raise NonFiniteLossError(f"{n} updates skipped for NaN/inf (more than nonfinite_max_skips="
                                 f"{self.max_skips}); last at step {at} ({what}). Last good checkpoint: "
                                 f"{self.good_checkpoint()}.")
      return {k: v for k, v in row.items() if k not in bad}
    raise NonFiniteLossError(
        f"non-finite {what} at step {at} (lr {row['train/lr']:.3g}); stopping. Last good checkpoint: "
        f"{self.good_checkpoint()} -- rerunning the same command resumes from it. Lower optimizer.lr, enable "
        f"optimizer.clip_grad_norm, check the data, or set --config.nonfinite_policy=skip to drop such updates "
        f"(counted in train/nonfinite_skips).")

  def row(self, step: int) -> dict | None:
    """The log row of the window ending at `step` (see the module docstring), and a new window."""
    window = self._window
    if not window:
      return None
    dt = max(time.time() - self._t_window, 1e-9)
    keys = set().union(*window)
    row = {k: float(np.mean([w[k] for w in window if k in w])) for k in sorted(keys)
           if any(k in w for w in window)}
    if "train/nonfinite_skips" in keys:
      row["train/nonfinite_skips"] = window[-1].get("train/nonfinite_skips", 0.0)
    row["train/images_per_sec"] = self._n_window * self.images_per_step / dt
    row["train/epoch"] = step / self.steps_per_epoch
    self._window, self._t_window, self._n_window = [], time.time(), 0
    return row
