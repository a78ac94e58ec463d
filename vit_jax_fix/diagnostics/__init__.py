"""Collapse diagnostics: feature collapse, attention collapse and over-smoothing, per block, for any model.

Python API (the notebooks use this):

    from vit_jax_fix import create_model, diagnostics
    model = create_model('deit_small_patch16_224', img_size=32, patch_size=4, num_classes=10)
    res = diagnostics.collect(model, diagnostics.dataset_batches(32, model_name='deit_small_patch16_224'),
                              num_batches=4)                      # one model -> dict of per-block lists
    results = diagnostics.diagnose({'plain': model, 'other': other_model}, data='demo', num_batches=4)
    diagnostics.plot_all(results, 'out/')                          # PNGs, one line per model
    diagnostics.log_diagnostics(writer, step, res)                 # TensorBoard scalars (trainer hook)

Linear probes per block (closed-form ridge on frozen features, big_vision's few-shot evaluator):

    res = diagnostics.probe.dataset_probe(model, 'demo', max_train=2000)   # accuracy per depth and pool
    diagnostics.plot_probe_vs_depth({'model': res}, 'out/probe_vs_depth.png')

Measures and their exact definitions: `measures.py`; aggregation and output keys: `collect.py`; the CLI:
`python -m vit_jax_fix.diagnose`. A library: it measures models it is given and never imports the trainer
(the CLI loads trainer checkpoints; the trainer calls `DiagnosticsHook`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from vit_jax_fix.diagnostics import measures, probe
from vit_jax_fix.diagnostics.collect import (MEASURE_NAMES, DiagnosticsConfig, collect, dataset_batches,
                                             finalize, measure_fn, model_image_size, random_batches)
from vit_jax_fix.diagnostics.plots import (plot_all, plot_attention_similarity, plot_hf_bands,
                                           plot_measures_vs_depth, plot_probe_vs_depth)

__all__ = [
    "DiagnosticsConfig", "MEASURE_NAMES", "collect", "dataset_batches", "diagnose", "finalize",
    "log_diagnostics", "make_batches", "measure_fn", "measures", "plot_all",
    "plot_attention_similarity", "plot_hf_bands", "plot_measures_vs_depth", "plot_probe_vs_depth", "probe",
    "random_batches",
    "DiagnosticsHook",
]


def make_batches(model, data: str | Iterable = "demo", *, batch_size: int = 64, num_batches: int = 4,
                 model_name: str | None = None, seed: int = 0):
  """Batches for `model`: 'demo' (the embedded dataset), 'random' (Gaussian images), any other tfds name
  handled by `vit_jax_fix.data`, or an iterable of batches passed through unchanged."""
  if not isinstance(data, str):
    return data
  size = model_image_size(model)
  if data == "random":
    return random_batches(size, batch_size=batch_size, num_batches=num_batches, seed=seed)
  if size[0] != size[1]:
    raise ValueError(f"dataset images are square; the model expects {size}")
  return dataset_batches(size[0], dataset=data, batch_size=batch_size,
                         model_name=model_name or getattr(model, "spec_name", None))


def diagnose(models: Mapping[str, Any], data: str | Iterable = "demo", *,
             cfg: DiagnosticsConfig = DiagnosticsConfig(), batch_size: int = 64, num_batches: int = 4,
             progress: bool = True, seed: int = 0) -> dict:
  """{label: model} -> {label: collect(...) result}; each model sees the same images (per image size)."""
  out = {}
  for label, model in models.items():
    batches = make_batches(model, data, batch_size=batch_size, num_batches=num_batches, seed=seed)
    out[label] = collect(model, batches, cfg, num_batches=num_batches, progress=progress, desc=label)
  return out


def scalars(measures_result: Mapping, *, prefix: str = "collapse") -> dict[str, float]:
  """Flat {name: value}: '{prefix}/{measure}/block_{i:02d}' per block (i = depth index, 0 = embedding for
  token measures), plus '{prefix}/similar_blocks'. NaN/None values are left out."""
  out = {}
  for key in MEASURE_NAMES:
    values = measures_result.get(key)
    if values is None:
      continue
    if key == "attn_similarity_offset":
      depth = [i + 1 + measures_result["config"]["offset"] for i in range(len(values))]
    elif key.startswith("attn"):
      depth = measures_result["attn_depth"]
    else:
      depth = measures_result["token_depth"]
    for d, v in zip(depth, values):
      if v is not None and math.isfinite(v):
        out[f"{prefix}/{key}/block_{d:02d}"] = float(v)
  out[f"{prefix}/similar_blocks"] = float(measures_result["similar_blocks"])
  return out


def log_diagnostics(writer, step: int, measures_result: Mapping, *, prefix: str = "collapse") -> dict:
  """Write one scalar per measure per block to `writer`, which may be a clu metric writer
  (`write_scalars(step, dict)`), a flax/TF-style summary writer (`scalar(name, value, step)`), or a
  torch/tensorboardX SummaryWriter (`add_scalar(name, value, step)`). Returns the scalars written."""
  values = scalars(measures_result, prefix=prefix)
  if hasattr(writer, "write_scalars"):
    writer.write_scalars(int(step), values)
  elif hasattr(writer, "scalar"):
    for k, v in values.items():
      writer.scalar(k, v, int(step))
  elif hasattr(writer, "add_scalar"):
    for k, v in values.items():
      writer.add_scalar(k, v, int(step))
  else:
    raise TypeError("writer needs write_scalars(step, dict), scalar(name, value, step) or "
                    "add_scalar(name, value, step)")
  if hasattr(writer, "flush"):
    writer.flush()
  return values


class DiagnosticsHook:
  """Periodic diagnostics for a training loop: `hook(step, model, writer)` measures every `every_steps`
  steps on a fixed set of batches (kept in memory) and logs them with `log_diagnostics`.

      hook = DiagnosticsHook(every_steps=1000, batches=list(make_batches(model, 'demo', num_batches=2)))
      ...; hook(step, model, writer)   # in the loop; returns the result dict when it ran, else None
  """

  def __init__(self, every_steps: int, batches: Iterable, cfg: DiagnosticsConfig = DiagnosticsConfig(),
               prefix: str = "collapse"):
    self.every_steps = int(every_steps)
    self.batches = list(batches)
    self.cfg = cfg
    self.prefix = prefix

  def __call__(self, step: int, model, writer=None):
    if self.every_steps <= 0 or step % self.every_steps:
      return None
    res = collect(model, self.batches, self.cfg, num_batches=len(self.batches), progress=False)
    if writer is not None:
      log_diagnostics(writer, step, res, prefix=self.prefix)
    return res
