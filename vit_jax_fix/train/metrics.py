"""Metric writers: one JSON object per log step in ``<workdir>/metrics.jsonl`` and TensorBoard event files
(``tf.summary``) in ``<workdir>/tensorboard``. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


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

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a")
      if tensorboard:
        import tensorflow as tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    self._file.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in row.items()}) + "\n")
    self._file.flush()
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step":
            _tb_scalar(tf, k, v)
      self._tb.flush()

  def close(self):
    if self.active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
