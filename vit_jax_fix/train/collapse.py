"""Periodic collapse diagnostics during training (config.diagnostics; issue #7).

Every `diagnostics.every_steps` steps the current (raw, not EMA) weights are measured in eval mode on the same
`num_batches` eval-split batches (read once at start-up, `batch_size` images each per process) with
`vit_jax_fix.diagnostics`: feature diversity, token similarity, cross-layer attention similarity, frequency
content, per block. Process 0 writes

- the scalars `collapse/<measure>/block_<i>` and `collapse/similar_blocks` to metrics.jsonl and TensorBoard,
- the full result as `<workdir>/diagnostics/step_<N>.json`,
- plots over training (one line per measured step, at most 8 spread over the run) in `<workdir>/diagnostics/`.

The weights are gathered to every process (`process_allgather`), so FSDP-sharded runs and multi-host runs
measure the same full model; every process runs the measures on its own batches, process 0's are logged.
"""
from __future__ import annotations

import itertools
import json

import jax
from jax.experimental import multihost_utils

from vit_jax_fix import data as data_lib
from vit_jax_fix import diagnostics
from vit_jax_fix import paths

MAX_PLOTTED_STEPS = 8


class TrainingDiagnostics:

  def __init__(self, setup, workdir):
    dg = setup.config.diagnostics
    self.setup = setup
    self.every_steps = int(dg.every_steps)
    self.out_dir = paths.as_path(workdir) / "diagnostics"
    data_cfg = setup.config.data.copy_and_resolve_references()
    data_cfg.cache = False       # only the first batches are read: no partial tf.data cache (and its warning)
    batches = data_lib.build_eval_iterator(data_cfg, global_batch_size=int(dg.batch_size) *
                                           jax.process_count(), model_defaults=setup.model_defaults)
    batches = list(itertools.islice(batches, int(dg.num_batches)))
    if not batches:
      raise ValueError(f"config.diagnostics: the eval split of {setup.config.data.dataset!r} gave no batch")
    self.hook = diagnostics.DiagnosticsHook(self.every_steps, batches,
                                            diagnostics.DiagnosticsConfig(threshold=float(dg.threshold)))

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def __call__(self, step: int, state, writer) -> dict | None:
    """Measures and logs at the configured steps; returns the result dict when it ran."""
    if not self.due(step):
      return None
    params, stats = multihost_utils.process_allgather((state["params"], state["batch_stats"]), tiled=True)
    model = self.setup.model_def.model(params, stats, train=False)
    result = self.hook(step, model, writer)
    if jax.process_index() == 0:
      self.out_dir.mkdir(parents=True, exist_ok=True)
      (self.out_dir / f"step_{step}.json").write_text(json.dumps(result))
      self._plot()
    return result

  def logged_steps(self) -> list[int]:
    if not self.out_dir.is_dir():
      return []
    return sorted(int(f.name[5:-5]) for f in self.out_dir.iterdir()
                  if f.name.startswith("step_") and f.name.endswith(".json"))

  def _plot(self):
    steps = self.logged_steps()
    if len(steps) > MAX_PLOTTED_STEPS:     # first, last and evenly spaced ones in between
      idx = sorted({round(i * (len(steps) - 1) / (MAX_PLOTTED_STEPS - 1)) for i in range(MAX_PLOTTED_STEPS)})
      steps = [steps[i] for i in idx]
    results = {}
    for s in steps:
      results[f"step {s}"] = json.loads((self.out_dir / f"step_{s}.json").read_text())
    diagnostics.plot_all(results, self.out_dir, title=f"{self.setup.model_def.name}: collapse measures over training")
