"""The base training config and its validation.

Every config in ``configs/`` starts from :func:`base_config` and changes values; it never adds keys. An unknown
or misspelled key (``config.optimizer.weight_decy``, or ``--config.batch_sise=8`` on the command line) is an
error naming the key and the nearest valid one. Model overrides (``config.model.overrides``) are checked against
the model's constructor by the registry, data keys against ``vit_jax_fix.data.default_data_config()``.

======================================= ===================================================================
key                                     meaning
======================================= ===================================================================
seed                                    parameters, dropout/drop-path, mixup and data order
model.name, model.overrides             ``create_model(name, **overrides)``; num_classes and img_size are
                                        filled from the data unless given
data.*                                  the input pipeline (see ``vit_jax_fix.data.pipeline``)
batch_size                              global batch per optimizer update (all devices and processes)
num_epochs / total_steps                training length; total_steps > 0 wins (optimizer updates)
optimizer.name                          'adamw' | 'lamb' (DeiT III: trust ratio on decayed params only)
optimizer.lr, optimizer.lr_batch_scale  peak lr = lr * batch_size / lr_batch_scale (DeiT); 0 = unscaled
optimizer.weight_decay, .wd_exempt      decoupled weight decay; exempt: 1-D params (biases, norms,
                                        LayerScale), pos_embed, cls/dist tokens, and regexes in wd_exempt
optimizer.clip_grad_norm                global-norm clipping (0 = off)
optimizer.grad_accum_steps              optax.MultiSteps micro-batches per update
optimizer.layer_decay                   layer-wise lr decay d (0 = off): update x d ** (L + 1 - layer id), timm's
                                        param_groups_layer_decay ids (stem 0, block i -> i + 1, head L + 1)
optimizer.freeze                        regex (re.fullmatch) on per-block parameter paths ('blocks/3/mlp/fc1/
                                        kernel'): those parameters are not trained ('' = none; see train.transfer)
schedule.*                              linear warm-up from warmup_init_lr over warmup_epochs (or
                                        warmup_steps), then cosine to min_lr (``train.optim``)
schedule.step_per                       'update' (default): the smooth form, a new value every update |
                                        'epoch' (paper configs): the official DeiT main.py schedule, timm's
                                        cosine stepped after each epoch -- constant within an epoch, epoch
                                        e at timm's value for max(e - 1, 0) | 'epoch_timm' (DeepViT,
                                        AugViT): as timm's train.py steps it, epoch e at timm's value for e
schedule.cooldown_epochs                epochs at min_lr after the cosine (timm's cooldown_epochs), added to
                                        the training length (num_epochs / total_steps count the cosine)
loss                                    'softmax_ce' (soft targets) | 'bce' (DeiT III)
ema.decay, ema.evaluate                 parameter EMA (0 = off) and whether it is evaluated too
train_mode                              False: dropout / drop-path / BN updates off while training (EViT FT)
bn_recalibration.*                      DeepViT: reset and re-estimate BN statistics before each eval
mesh.data, mesh.fsdp, sharding.*        device mesh ('data', 'fsdp') and parameter sharding rules
keep_rate_schedule.*                    EViT keep-rate warm-up: 1 for start_epochs, cosine to the model's
                                        keep rate over ramp_epochs, quantised to `granularity` so at most
                                        ceil((1 - keep_rate) / granularity) + 1 train steps are compiled
                                        (``vit_jax_fix.models.keep_rate``); evaluation uses the model's rate
diagnostics.*                           collapse measures every N steps on fixed eval batches, logged to
                                        metrics.jsonl / TensorBoard as collapse/<measure>/block_<i>, JSON and
                                        plots per step in <workdir>/diagnostics/
distillation.*                          DeiT distillation: type 'none' | 'soft' | 'hard', alpha, tau, the teacher
                                        (a registered name + overrides; weights: the zoo's file, a file or workdir,
                                        or 'random'); the loss and the teacher step in ``train.distill``
init_from.*                             fine-tune from a checkpoint/workdir or PyTorch weights
evals                                   what ``python -m vit_jax_fix.evaluate`` evaluates, e.g. ('val', 'real',
                                        'v2'): 'val' the data's eval split, 'real' ImageNet-ReaL labels (tfds
                                        imagenet2012_real), 'v2' ImageNet-V2 matched-frequency (tfds
                                        imagenet_v2; 'v2/threshold-0.7', 'v2/topimages'), all read from
                                        data.data_dir with the eval transform of data.*; the trainer
                                        evaluates 'val' only
log_every_steps, eval_every_steps, checkpoint_every_steps, max_to_keep, eval_batch_size, progress_bar
nonfinite_policy, nonfinite_max_skips   NaN/inf loss or gradients: 'stop' (default: error naming the step,
                                        the metric and the last good checkpoint) | 'skip' (the update is
                                        dropped, counted in train/nonfinite_skips; stop after max skips)
debug_step_sleep, debug_crash_at_step,  fault injection for the reliability tests (sleep per step, raise
debug_nan_at_step                       at a step, NaN loss at a step); never set them in real runs
======================================= ===================================================================
"""
from __future__ import annotations

import difflib
import math
import re

import ml_collections

from vit_jax_fix import errors
from vit_jax_fix.errors import ConfigError
from vit_jax_fix.data import default_data_config

ConfigDict = ml_collections.ConfigDict


def _none(kind):
  return ml_collections.config_dict.placeholder(kind)


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.model = ConfigDict()
  c.model.name = "deit_small_patch16_224"
  c.model.overrides = ConfigDict()          # free-form: checked against the model constructor
  c.data = default_data_config()
  c.batch_size = 1024
  c.num_epochs = 300.0
  c.total_steps = -1
  c.optimizer = ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4
  c.optimizer.lr_batch_scale = 512         # 0: lr is used as given (DeiT III --unscale-lr)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.wd_exempt = ("pos_embed", "cls_token", "dist_token")
  c.optimizer.clip_grad_norm = 0.0
  c.optimizer.grad_accum_steps = 1
  c.optimizer.layer_decay = 0.0            # layer-wise lr decay (0 = off; BEiT / timm --layer-decay)
  c.optimizer.freeze = ""                  # regex on per-block param paths: frozen ('' = none)
  c.schedule = ConfigDict()
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_steps = -1              # > 0 wins over warmup_epochs
  c.schedule.warmup_init_lr = 1e-6
  c.schedule.min_lr = 1e-5
  c.schedule.step_per = "update"            # 'update' | 'epoch' | 'epoch_timm' (official per-epoch stepping)
  c.schedule.cooldown_epochs = 0.0          # epochs at min_lr after the cosine (DeepViT, AugViT: 10)
  c.loss = "softmax_ce"
  c.ema = ConfigDict()
  c.ema.decay = 0.99996                     # 0 = off
  c.ema.evaluate = True
  c.train_mode = True
  c.bn_recalibration = ConfigDict()
  c.bn_recalibration.enabled = False
  c.bn_recalibration.num_batches = 50
  c.bn_recalibration.batch_size = 256
  c.mesh = ConfigDict()
  c.mesh.data = -1                          # -1: all devices left after fsdp
  c.mesh.fsdp = 1
  c.sharding = ConfigDict()
  c.sharding.strategy = "replicated"        # 'replicated' | 'fsdp'
  c.sharding.fsdp_min_size = 2 ** 12        # smaller arrays stay replicated under FSDP
  c.sharding.rules = ()                     # ((regex, 'fsdp' | 'replicated'), ...) first match wins
  c.keep_rate_schedule = ConfigDict()       # EViT from scratch: keep rate 1, then cosine down to the model's
  c.keep_rate_schedule.enabled = False      # configured keep rate (official adjust_keep_rate), quantised
  c.keep_rate_schedule.start_epochs = 10.0  # epochs at keep rate 1 (official shrink_start_epoch)
  c.keep_rate_schedule.ramp_epochs = 100.0  # cosine ramp length (official shrink_epochs)
  c.keep_rate_schedule.granularity = 0.05   # quantisation step: at most ceil((1-base)/g)+1 compiled steps
  c.diagnostics = ConfigDict()              # periodic collapse diagnostics (vit_jax_fix.diagnostics)
  c.diagnostics.every_steps = 0             # 0: off; else every N steps, logged as collapse/* scalars
  c.diagnostics.num_batches = 2             # first N eval-split batches (fixed for the whole run)
  c.diagnostics.batch_size = 32             # images per batch (per process)
  c.diagnostics.threshold = 0.9             # cross-layer attention similarity threshold (#similar blocks)
  c.distillation = ConfigDict()             # DeiT knowledge distillation (train/distill.py)
  c.distillation.type = "none"              # 'none' | 'soft' | 'hard'
  c.distillation.alpha = 0.5                # loss = (1 - alpha) base + alpha distillation
  c.distillation.tau = 1.0                  # soft: temperature
  c.distillation.teacher = ""               # registered model name, e.g. 'regnety_160'
  c.distillation.teacher_overrides = ConfigDict()   # free-form: its constructor overrides
  c.distillation.teacher_weights = ""       # '' the zoo's released file | file / workdir | 'random' (tests)
  c.distillation.teacher_layout = "auto"    # torch key layout of a teacher file: 'official' | 'timm' | 'auto'
  c.init_from = ConfigDict()
  c.init_from.path = ""                     # workdir/checkpoint dir, or .pth/.pt/.bin/.safetensors
  c.init_from.pretrained = False            # True: the authors' weights of model.name (registry table, cached)
  c.init_from.layout = "official"           # torch key layout: 'official' | 'timm' | 'auto' (detected)
  c.init_from.ema = False                   # take the EMA weights of a checkpoint / state_dict_ema
  # 'auto' (a new head when the class count differs) | True | False; typed object so that a config file and
  # --config.init_from.reinit_head=True both give a bool (a str field would turn the flag into the string 'True').
  c.init_from.reinit_head = ml_collections.FieldReference("auto", field_type=object)
  c.evals = ("val",)                        # python -m vit_jax_fix.evaluate: ('val', 'real', 'v2')
  c.log_every_steps = 50
  c.eval_every_steps = -1                   # -1: once per epoch; 0: only at the end
  c.checkpoint_every_steps = 1000
  c.max_to_keep = 2
  c.eval_batch_size = 0                     # 0: batch_size
  c.progress_bar = True
  c.nonfinite_policy = "stop"               # 'stop' | 'skip' (drop non-finite updates, counted)
  c.nonfinite_max_skips = 100               # 'skip': stop anyway after this many skipped updates
  c.debug_step_sleep = 0.0                  # seconds slept per step (tests kill a run mid-way)
  c.debug_crash_at_step = -1                # > 0: raise inside the loop once this step has run (tests)
  c.debug_nan_at_step = -1                  # > 0: the loss of this step is NaN (tests)
  return c


FREE_FORM = ("model.overrides", "distillation.teacher_overrides")


def _nearest(key, valid):
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.4)
  return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def check_keys(config, reference=None, prefix: str = "") -> None:
  """Raises KeyError for any key of `config` not in `reference` (default: base_config()), recursively."""
  reference = base_config() if reference is None else reference
  for key in config.keys():
    full = f"{prefix}{key}"
    if key not in reference:
      raise errors.ConfigKeyError(f"unknown config key {full!r}.{_nearest(key, reference.keys())}")
    if full in FREE_FORM:
      continue
    sub, ref = config[key], reference[key]
    if isinstance(ref, ConfigDict):
      if not isinstance(sub, (ConfigDict, dict)):
        raise ConfigError(f"config key {full!r} must be a group of keys, got {sub!r}")
      check_keys(sub, ref, prefix=f"{full}.")


def check_key_path(path: str) -> None:
  """A dotted override path (`optimizer.lr`, `model.overrides.feat_scale`) names keys of the base config up to
  a free-form group; else a ConfigKeyError naming the nearest valid key."""
  ref, done = base_config(), []
  for key in re.sub(r"\[[^]]*\]", "", path).split("."):
    if ".".join(done) in FREE_FORM:
      return
    if not isinstance(ref, ConfigDict) or key not in ref:
      where = f"config.{'.'.join(done)}" if done else "config"
      valid = ref.keys() if isinstance(ref, ConfigDict) else ()
      raise errors.ConfigKeyError(f"unknown config key {'.'.join(done + [key])!r} "
                                  f"(--config.{path}).{_nearest(key, valid)}" if valid else
                                  f"{where} is a value, not a group: --config.{path} cannot be set.")
    ref = ref[key]
    done.append(key)


def validate(config) -> None:
  """Key names (nearest-match errors), model overrides, and value ranges."""
  from vit_jax_fix.models import registry
  check_keys(config)
  spec = registry.get_spec(config.model.name)
  registry.check_overrides(spec.builder, dict(config.model.overrides), f"config.model.overrides ({spec.name})")
  if config.optimizer.name not in ("adamw", "lamb"):
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r}: use 'adamw' or 'lamb'.")
  check_step_per(config.schedule.step_per)
  if config.loss not in ("softmax_ce", "bce"):
    raise ConfigError(f"config.loss={config.loss!r}: use 'softmax_ce' or 'bce'.")
  krs = config.keep_rate_schedule
  if krs.enabled and not (krs.granularity > 0 and krs.start_epochs >= 0 and krs.ramp_epochs >= 0):
    raise ConfigError(f"config.keep_rate_schedule: granularity must be > 0 and start_epochs / ramp_epochs >= 0, "
                      f"got {dict(krs)}.")
  dg = config.diagnostics
  if dg.every_steps < 0 or (dg.every_steps and (dg.num_batches < 1 or dg.batch_size < 1)):
    raise ConfigError(f"config.diagnostics: every_steps must be >= 0 (0 = off) and num_batches, batch_size >= 1, "
                      f"got {dict(dg)}.")
  if config.sharding.strategy not in ("replicated", "fsdp"):
    raise ConfigError(f"config.sharding.strategy={config.sharding.strategy!r}: use 'replicated' or 'fsdp'.")
  if config.loss == "bce" and not config.data.bce_targets:
    raise ConfigError("config.loss='bce' (DeiT III) needs config.data.bce_targets=True and label_smoothing=0.")
  k = int(config.optimizer.grad_accum_steps)
  if k < 1 or config.batch_size % k:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by "
                      f"optimizer.grad_accum_steps={k} (>= 1).")
  if config.total_steps <= 0 and not config.num_epochs > 0:
    raise ConfigError("set config.num_epochs > 0 or config.total_steps > 0.")
  if not config.schedule.cooldown_epochs >= 0:
    raise ConfigError(f"config.schedule.cooldown_epochs={config.schedule.cooldown_epochs} must be >= 0.")
  if not 0.0 <= config.optimizer.layer_decay <= 1.0:
    raise ConfigError(f"config.optimizer.layer_decay={config.optimizer.layer_decay} must be in [0, 1] (0 = off).")
  if config.init_from.reinit_head not in (True, False, "auto"):
    raise ConfigError(f"config.init_from.reinit_head={config.init_from.reinit_head!r}: use 'auto' (a new head when "
                      "the class count differs), True or False.")
  if not 0.0 <= config.ema.decay < 1.0:
    raise ConfigError(f"config.ema.decay={config.ema.decay} must be in [0, 1).")
  if config.nonfinite_policy not in ("stop", "skip"):
    raise ConfigError(f"config.nonfinite_policy={config.nonfinite_policy!r}: use 'stop' or 'skip'.")
  from vit_jax_fix.train import evaluate as eval_lib
  eval_lib.check_evals(config.evals)
  from vit_jax_fix.train import distill
  distill.check(config)


SCHEDULE_STEP_PER = ("update", "epoch", "epoch_timm")


def check_step_per(value) -> None:
  if value not in SCHEDULE_STEP_PER:
    raise ConfigError(f"config.schedule.step_per={value!r}: use 'update' (a new learning rate every update), "
                      f"'epoch' (the official DeiT main.py per-epoch schedule) or 'epoch_timm' (timm's train.py "
                      f"per-epoch schedule).")


def peak_lr(config) -> float:
  scale = config.optimizer.lr_batch_scale
  return float(config.optimizer.lr) * (config.batch_size / scale if scale else 1.0)


def steps_per_epoch(config, num_train_examples: int) -> int:
  """Optimizer updates per epoch (at least 1)."""
  return max(1, num_train_examples // int(config.batch_size))


def cooldown_updates(config, steps_per_epoch_: int) -> int:
  """Optimizer updates of the cooldown at min_lr after the cosine (schedule.cooldown_epochs)."""
  return int(round(float(config.schedule.get("cooldown_epochs", 0.0)) * steps_per_epoch_))


def total_steps(config, num_train_examples: int) -> int:
  """Optimizer updates of the run: the cosine (total_steps, or num_epochs) plus the cooldown epochs."""
  spe = steps_per_epoch(config, num_train_examples)
  if config.total_steps > 0:
    return int(config.total_steps) + cooldown_updates(config, spe)
  return max(1, int(math.ceil(config.num_epochs * spe))) + cooldown_updates(config, spe)


def from_dict(d: dict) -> ConfigDict:
  return ConfigDict(d)
