"""Evaluate a model without training: a trainer checkpoint, a weights file, or the authors' released weights.

    python -m vit_jax_fix.evaluate --config configs/deit_s.py --pretrained --out results.json
    python -m vit_jax_fix.evaluate --config configs/deit_s.py:demo --checkpoint /tmp/deit_s_demo --ema
    python -m vit_jax_fix.evaluate --config configs/deit_s.py --weights deit_small.pth --config.evals=val,real,v2
    python -m vit_jax_fix.evaluate --config configs/evit_s.py:finetune --checkpoint W --keep_rates=0.5,0.7,1.0

The model, the data and its eval transform come from `--config FILE[:ARG]` with `--config.KEY=VALUE` overrides,
parsed as main.py parses them (`vit_jax_fix.train.cli`); the weights from exactly one of
* `--checkpoint WORKDIR[/checkpoints/STEP]`: a trainer checkpoint (a workdir's latest step, or that step);
* `--weights FILE`: PyTorch `.pth/.pt/.bin/.safetensors` (official or timm key layout: detected, `--layout`
  forces one) or a Google ViT `.npz`;
* `--pretrained`: the registry's released file for `config.model.name`, downloaded once into the cache
  (`vit_jax_fix.interop.weights.resolve`) and read with the table's key layout.
`--ema` takes the EMA weights (the checkpoint's EMA; the file's `state_dict_ema` / `model_ema`).

The evaluation is the trainer's own (`vit_jax_fix.train.loop.Setup`: mesh, model, sharded jitted eval step;
`vit_jax_fix.train.evaluate.evaluate`): padded, masked batches, every example of the split counted exactly
once, so a trained workdir evaluates to the top-1 its run logged. DeepViT's BatchNorm re-calibration runs first
when `config.bn_recalibration.enabled`, on the raw weights, as the trainer does before every evaluation (its EMA
evaluation keeps the EMA's statistics). Weights are fitted onto the configured model as `init_from` fits them
(`finetune.fit_weights`: pos_embed resized when the resolution differs) except the classifier: a head of
another class count than the data's is an error, never a fresh head.

Evaluators: `config.evals` (default ('val',); 'real' ImageNet-ReaL, 'v2' ImageNet-V2; see
`vit_jax_fix.train.evaluate`). Each prints `NAME: top-1 ... top-5 ... loss ... (N images, R images/s)`;
`--out FILE` writes JSON `{NAME: {"top1", "top5", "loss", "num_examples", "images_per_sec"}}`. `images_per_sec`
counts the examples after the first batch over the wall time from its end (the first batch compiles), input
pipeline included; with a single batch it is the whole evaluation, compilation included.

EViT's accuracy / speed trade-off from one set of weights: `--config.model.overrides.keep_rate=0.5` evaluates at
another keep rate; `--keep_rates=0.5,0.7,1.0` evaluates at each (one compiled program per rate) and writes
`{"keep_rates": {"0.5": {NAME: {...}}, ...}}`.

Mistakes a user can fix (no or two weight sources, a missing checkpoint, a dataset that is not prepared, weights
that do not fit the model) end with the message alone on stderr: exit code 2 for usage/config, 1 otherwise.
"""
from __future__ import annotations

import sys

from vit_jax_fix import hostmem

if __name__ == "__main__":
  # Before JAX loads: glibc reads its tunables at start-up (as main.py).
  hostmem.maybe_reexec_with_huge_pages(["-m", "vit_jax_fix.evaluate", *sys.argv[1:]])

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from absl import flags, logging  # noqa: E402

from vit_jax_fix import errors  # noqa: E402
from vit_jax_fix import paths  # noqa: E402
from vit_jax_fix.train import cli  # noqa: E402

SOURCES = ("checkpoint", "weights", "pretrained")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """--config (with --config.KEY=VALUE overrides) and the evaluation flags, on `flag_values`."""
  cli.define_config_flag(flag_values, sys_argv=sys_argv)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("checkpoint", None, "Trainer workdir (latest step) or WORKDIR/checkpoints/STEP.", **fv)
  flags.DEFINE_string("weights", None, "PyTorch .pth/.pt/.bin/.safetensors or Google .npz weights file.", **fv)
  flags.DEFINE_bool("pretrained", False, "The authors' released weights of config.model.name (registry table; "
                    "downloaded once into $VIT_JAX_FIX_CACHE).", **fv)
  flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of the checkpoint / file.", **fv)
  flags.DEFINE_enum("layout", "auto", ["auto", "official", "timm"],
                    "Key layout of a PyTorch --weights file (auto: detected).", **fv)
  flags.DEFINE_string("out", None, "Write the results as JSON to this file.", **fv)
  flags.DEFINE_list("keep_rates", None, "EViT: evaluate at each of these keep rates (e.g. 0.5,0.7,1.0).", **fv)
  flags.mark_flag_as_required("config", flag_values=flag_values)


def source_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """{'checkpoint' | 'weights' | 'pretrained': value} -- exactly one source, else a UsageError."""
  given = {k: flag_values[k].value for k in SOURCES if flag_values[k].value}
  if len(given) != 1:
    what = "none was given" if not given else f"got {' and '.join('--' + k for k in given)}"
    raise errors.UsageError(f"give exactly one of --checkpoint WORKDIR[/checkpoints/STEP], --weights FILE or "
                            f"--pretrained ({what}).")
  return given


def keep_rates_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[float] | None:
  values = flag_values["keep_rates"].value
  if not values:
    return None
  try:
    rates = [float(v) for v in values]
  except ValueError:
    raise errors.UsageError(f"--keep_rates={','.join(values)}: give numbers in (0, 1], e.g. 0.5,0.7,1.0") from None
  bad = [r for r in rates if not 0 < r <= 1]
  if bad:
    raise errors.UsageError(f"--keep_rates: {bad} not in (0, 1].")
  return rates


# ---------------------------------------------------------------------------------------------- weights

def describe_source(checkpoint=None, weights=None, pretrained=False) -> str:
  if checkpoint:
    return f"checkpoint {checkpoint}"
  if weights:
    return f"weights {weights}"
  return "pretrained weights"


def load_weights(setup, *, checkpoint: str | None = None, weights: str | None = None, pretrained: bool = False,
                 ema: bool = False, layout: str = "auto"):
  """(params, batch_stats) of the source fitted onto `setup.model_def`: host trees, blocks per block (the
  stacked layout depends on the keep rates, so `place` stacks them for each setup)."""
  import jax
  import numpy as np

  from vit_jax_fix.train import finetune
  model_def = setup.model_def
  if pretrained:
    from vit_jax_fix.interop.weights import released
    path, layout = released(model_def.name)     # cached, else the mirror, else downloaded (verified)
    label = f"pretrained weights of {model_def.name} ({path})"
  else:
    path = checkpoint or weights
    if weights and not os.path.isfile(weights):
      raise errors.MissingFileError(f"--weights {weights!r}: no such file.")
    if weights and not weights.endswith(finetune.TORCH_SUFFIXES):
      raise errors.ArgumentError(f"--weights {weights!r}: expected a {', '.join(finetune.TORCH_SUFFIXES)} file "
                                 "(a trainer workdir goes to --checkpoint).")
    label = describe_source(checkpoint, weights)
  src_p, src_s = finetune.read_weights(path, model_def, layout=layout, ema=ema)
  # Targets of the right shapes: zeros (calloc'd, untouched) instead of running the initialisers.
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
  params, stats = finetune.fit_weights(
      model_def, zeros(model_def.abstract_params()), zeros(model_def.abstract_stats()), src_p, src_s,
      reinit_head=False, source=label,
      hint=f"Evaluation uses the weights as they are: check config.model.name ({model_def.name}) and "
           f"config.model.overrides against them, and that the data's class count ({setup.num_classes}) is the "
           f"head's.")
  return model_def.per_block(params), model_def.per_block(stats)


def place(setup, params, batch_stats):
  """Per-block host trees -> the setup's layout, on its mesh in the state's shardings."""
  import jax
  md = setup.model_def
  return (jax.device_put(md.train_layout(params), setup.state_sh["params"]),
          jax.device_put(md.train_layout(batch_stats), setup.state_sh["batch_stats"]))


# ------------------------------------------------------------------------------------------- evaluating

def _print0(line: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(line, flush=True)


class _Timed:
  """Host batches passed through, timing from the end of the first batch's step (which compiles) to the end of
  the last: the first batch is consumed and evaluated before the second is asked for."""

  def __init__(self, batches):
    self.batches, self.examples, self.seconds, self.first = batches, 0.0, 0.0, 0.0

  def __iter__(self):
    import numpy as np
    start = time.perf_counter()
    it = iter(self.batches)
    for first in it:
      self.first = float(np.sum(first["mask"]))
      yield first
      break
    t0 = time.perf_counter()
    for batch in it:
      self.examples += float(np.sum(batch["mask"]))
      yield batch
    if self.examples:
      self.seconds = time.perf_counter() - t0
    else:        # a single batch: the whole evaluation, compilation included
      self.examples, self.seconds = self.first, time.perf_counter() - start


def _check_classes(setup, name: str, data_cfg) -> None:
  from vit_jax_fix import data as data_lib
  n, is_set = data_lib.pipeline.eval_label_classes(data_cfg)
  model = setup.num_classes
  if n is not None and (n != model if is_set else n > model):
    raise errors.ConfigError(
        f"evaluator {name!r} ({data_cfg.dataset}) has {n} classes but the model's head has {model} (from "
        f"{setup.config.data.dataset}): its labels do not index this classifier. Evaluate it with a config "
        f"whose data has the same classes (ImageNet-1k for 'real' and 'v2').")


def evaluator_data(setup) -> dict:
  """{evaluator: its data config} for config.evals, each dataset checked (prepared, classes fit the head)."""
  from vit_jax_fix.train import evaluate as eval_lib
  names = eval_lib.evaluator_names(setup.config.evals)
  data_cfgs = {name: eval_lib.eval_data_config(setup.config.data, name) for name in names}
  for name, data_cfg in data_cfgs.items():
    _check_classes(setup, name, data_cfg)
  return data_cfgs


def evaluate_setup(setup, params, batch_stats, *, ema: bool = False, data_cfgs: dict | None = None,
                   printer=_print0) -> dict:
  """{evaluator: {top1, top5, loss, num_examples, images_per_sec}} for config.evals, on the setup's mesh."""
  import jax

  from vit_jax_fix.train import evaluate as eval_lib
  data_cfgs = evaluator_data(setup) if data_cfgs is None else data_cfgs
  if not ema:     # the trainer re-calibrates the raw weights' BatchNorm before each evaluation (DeepViT)
    batch_stats = setup.recalibrate_batch_norm(params, batch_stats)
  results = {}
  for name, data_cfg in data_cfgs.items():
    timed = _Timed(setup.eval_batches(data_cfg))
    out = eval_lib.evaluate(setup.eval_step, params, batch_stats, timed, setup.mesh, name)
    rate = timed.examples * jax.process_count() / timed.seconds if timed.seconds > 0 else float("nan")
    results[name] = {"top1": out[f"{name}/top1"], "top5": out[f"{name}/top5"], "loss": out[f"{name}/loss"],
                     "num_examples": out[f"{name}/count"], "images_per_sec": rate}
    r = results[name]
    printer(f"{name}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  loss {r['loss']:.4f}  "
            f"({r['num_examples']} images, {rate:.1f} images/s)")
  return results


def eval_config(config, keep_rate: float | None = None):
  """A copy of `config` for evaluation: the EViT keep-rate warm-up (a training schedule) off, and with
  `keep_rate` the model at that keep rate (model.overrides.keep_rate)."""
  from vit_jax_fix.models import registry
  c = copy.deepcopy(config)
  c.keep_rate_schedule.enabled = False
  if keep_rate is not None:
    spec = registry.get_spec(config.model.name)
    if "keep_rate" not in registry.valid_overrides(spec.builder):
      raise errors.UsageError(f"--keep_rates: {spec.name} has no EViT keep rate (model option keep_rate); use an "
                              f"EViT config such as configs/evit_s.py.")
    c.model.overrides.keep_rate = float(keep_rate)
  return c


def run(config, *, checkpoint: str | None = None, weights: str | None = None, pretrained: bool = False,
        ema: bool = False, layout: str = "auto", keep_rates=None, out: str | None = None, mesh=None,
        printer=_print0) -> dict:
  """Loads the weights once and evaluates every evaluator (at each keep rate); returns what --out writes."""
  import jax

  from vit_jax_fix.train import loop
  given = [k for k, v in (("checkpoint", checkpoint), ("weights", weights), ("pretrained", pretrained)) if v]
  if len(given) != 1:
    raise errors.UsageError(f"give exactly one of checkpoint, weights or pretrained (got {given or 'none'}).")
  # Everything that can be checked is, before any weights are read (or downloaded).
  runs = []
  for rate in keep_rates or [None]:
    setup = loop.Setup(eval_config(config, rate), mesh)
    mesh = setup.mesh
    runs.append((rate, setup, evaluator_data(setup)))
  source = dict(checkpoint=checkpoint, weights=weights, pretrained=pretrained)
  params, stats = load_weights(runs[0][1], **source, ema=ema, layout=layout)
  printer(f"{runs[0][1].model_def.name}: {describe_source(**source)}, {'EMA' if ema else 'raw'} weights")
  results = {}
  for rate, setup, data_cfgs in runs:
    if rate is not None:
      printer(f"keep rate {rate:g}:")
    res = evaluate_setup(setup, *place(setup, params, stats), ema=ema, data_cfgs=data_cfgs, printer=printer)
    if rate is None:
      results = res
    else:
      results.setdefault("keep_rates", {})[f"{rate:g}"] = res
  if out and jax.process_index() == 0:
    out_path = paths.as_path(out)       # local or gs://
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    printer(f"wrote {out}")
  return results


FLAGS = flags.FLAGS


def main(argv, flag_values: flags.FlagValues | None = None):
  """absl's main (parsed `flag_values`, default the global FLAGS); tests pass their own FlagValues."""
  fv = FLAGS if flag_values is None else flag_values
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments {argv[1:]}: use --config FILE[:ARG] (--checkpoint DIR | "
                            "--weights FILE | --pretrained) [--ema] [--out FILE] [--config.KEY=VALUE ...]")
  source = source_from_flags(fv)
  keep_rates = keep_rates_from_flags(fv)
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every restore at INFO
  from vit_jax_fix.train import sharding
  sharding.maybe_initialize_distributed()
  # Nothing returned: absl's app.run exits with main's return value.
  run(fv.config, **source, ema=fv.ema, layout=fv.layout, keep_rates=keep_rates, out=fv.out)


if __name__ == "__main__":
  define_flags(FLAGS)
  cli.run(main, prog="python -m vit_jax_fix.evaluate")
