"""Metric writers: one JSON object per log step in ``<workdir>/metrics.jsonl`` and TensorBoard event files
(``tf.summary``) in ``<workdir>/tensorboard``. Only process 0 writes. The workdir may be a bucket (gs://): the
JSON file is appended to through `etils.epath`, opened for each row (a bucket object is rewritten whole at each
append: fine for a row every few seconds; tf.io.gfile files only exist inside a `with`), and TensorFlow writes
gs:// event files itself."""
from __future__ import annotations

import json
import math

from etils import epath
import jax
import numpy as np

from vit_jax_fix import paths


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.dtype.kind == "f" else int(v)


def _tb_scalar(tf, name, value):
  """tf.summary.scalar without the tensorboard package: the same event with the 'scalars' plugin tag."""
  from tensorflow.core.framework import summary_pb2
  md = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
  tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=md.SerializeToString())


class MetricWriter:
  """write_scalars(step, {'train/loss': ...}) -> a JSON line and TensorBoard scalars."""

  def __init__(self, workdir, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    workdir = paths.as_path(workdir)
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.active:
      workdir.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        import tensorflow as tf
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    with self.path.open("a") as f:
      f.write(line + "\n")
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step":
            _tb_scalar(tf, k, v)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path) -> list[dict]:
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
