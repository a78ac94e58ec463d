"""Shared pieces of the configs: the base config and the `demo` argument (small model, embedded MNIST-5k)."""
from vit_jax_fix.errors import ConfigError
from vit_jax_fix.train.config import base_config


def base():
  return base_config()


def paper_base():
  """ImageNet-1k with the DeiT recipe (the base config's defaults): batch 1024, AdamW 5e-4 x batch/512,
  300 epochs, RandAugment m9, mixup 0.8 / cutmix 1.0, smoothing 0.1, erasing 0.25, repeated augmentation;
  the learning rate stepped per epoch exactly as the official main.py steps timm's cosine (schedule.step_per)."""
  c = base_config()
  c.data.dataset = "imagenet2012"
  c.data.image_size = 224
  c.batch_size = 1024
  c.num_epochs = 300
  c.schedule.step_per = "epoch"
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c


def deit3(c, *, batch: int, lr: float, epochs: int):
  """DeiT III: LAMB (unscaled lr), clip 1.0, BCE on binarised mixed targets, 3-Augment, no erasing."""
  c.batch_size = batch
  c.num_epochs = epochs
  c.optimizer.name = "lamb"
  c.optimizer.lr = lr
  c.optimizer.lr_batch_scale = 0
  c.optimizer.clip_grad_norm = 1.0
  c.loss = "bce"
  c.data.bce_targets = True
  c.data.label_smoothing = 0.0
  c.data.augment = "3aug"
  c.data.color_jitter = 0.3
  c.data.reprob = 0.0
  c.ema.evaluate = False
  c.model.overrides.drop_path_schedule = "constant"
  return c


def timm_train_py(c):
  """The schedule of timm's train.py (DeepViT, AugViT): the cosine stepped with the next epoch's index after each
  epoch (epoch e at timm's value for e), then timm's 10 cooldown epochs at min_lr (310 epochs run)."""
  c.schedule.step_per = "epoch_timm"
  c.schedule.cooldown_epochs = 10
  return c


SHUNTED_DEMO = dict(img_size=32, embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8),
                    drop_path_rate=0.0)


DEMO_MODEL = dict(img_size=28, patch_size=7, embed_dim=128, depth=6, num_heads=4, drop_path_rate=0.0)


def demo(c, model_overrides=None, epochs: float = 15.0, replace: bool = False):
  """Turns a paper config into a CPU demo of the same model family on the embedded MNIST-5k: depth 6,
  dim 128, patch 7 at 28 px (16 patches), light augmentation (no flips or mixing for digits), AdamW 1e-3, batch 128."""
  overrides = dict(model_overrides or {}) if replace else dict(DEMO_MODEL, **(model_overrides or {}))
  c.model.overrides = overrides
  c.data.dataset = "demo"
  c.data.image_size = int(overrides.get("img_size", 28))
  c.data.augment = "deit"
  c.data.rand_augment = ""
  c.data.color_jitter = 0.0
  c.data.hflip = 0.0
  c.data.scale = (0.75, 1.0)
  c.data.ratio = (0.9, 1.1)
  c.data.interpolation = "bilinear"
  c.data.crop_pct = 1.0
  c.data.reprob = 0.0
  c.data.repeated_aug = 1
  c.data.mixup = 0.0
  c.data.cutmix = 0.0
  c.data.label_smoothing = 0.1
  c.data.bce_targets = False
  c.data.shuffle_buffer = 5000
  c.data.cache = True
  c.loss = "softmax_ce"
  c.train_mode = True
  c.ema.evaluate = True
  c.batch_size = 128
  c.num_epochs = epochs
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.lr_batch_scale = 0
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_grad_norm = 1.0
  c.optimizer.grad_accum_steps = 1
  c.optimizer.b2 = 0.999
  c.schedule.warmup_steps = -1
  c.schedule.warmup_epochs = 2
  c.schedule.step_per = "update"  # the demos were tuned with the smooth per-update schedule
  c.schedule.cooldown_epochs = 0
  c.schedule.min_lr = 1e-5
  c.ema.decay = 0.99            # ~100-step horizon: the demo trains ~500 steps
  c.bn_recalibration.num_batches = 4
  c.bn_recalibration.batch_size = 128
  c.log_every_steps = 20
  c.eval_every_steps = -1
  c.checkpoint_every_steps = 200
  c.eval_batch_size = 250
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c


def finish(c, arg: str):
  """Applies the config argument: '' (paper recipe) or 'demo'."""
  if arg == "demo":
    return demo(c)
  if arg:
    raise ConfigError(f"unknown config argument {arg!r}: use '' (paper recipe) or 'demo'")
  return c


def deepvit(depth: int, arg: str):
  """The DeepViT recipe (scripts/*.yaml) for the 16/24/32-block re-attention models."""
  c = paper_base()
  c.model.name = f"deepvit_patch16_224_re_attn_{depth}b"
  c.model.overrides.drop_path_rate = 0.2
  c.optimizer.lr = 5e-4
  c.optimizer.lr_batch_scale = 0
  c.data.repeated_aug = 1
  c.data.color_jitter = 0.4
  c.data.interpolation = "random"
  c.bn_recalibration.enabled = True
  timm_train_py(c)
  if depth == 32:  # the 32B yaml mixes less: mixup 0.1, no cutmix
    c.data.mixup = 0.1
    c.data.cutmix = 0.0
  if arg == "demo":
    return demo(c, dict(reattention=True, num_heads=4))
  return finish(c, arg)


def finetune_demo(c, model_overrides=None, *, image_size: int, source: str, epochs: float = 3.0,
                  lr: float = 2e-4):
  """The CPU demo of a fine-tuning config: the demo model (DEMO_MODEL + `model_overrides`) initialised from
  `source` -- the workdir of a from-scratch demo, trained at 28 px: run that demo first -- and fine-tuned on
  the embedded MNIST-5k at `image_size` (pos_embed resized when the grid differs). The config's transfer keys
  (layer decay, freezing, train mode, head re-initialisation) are kept; AdamW at `lr`, half an epoch of
  warm-up."""
  kept = dict(layer_decay=c.optimizer.layer_decay, freeze=c.optimizer.freeze, train_mode=c.train_mode,
              reinit_head=c.init_from.reinit_head)
  c = demo(c, dict(model_overrides or {}, img_size=image_size), epochs=epochs)
  c.optimizer.layer_decay, c.optimizer.freeze = kept["layer_decay"], kept["freeze"]
  c.train_mode, c.init_from.reinit_head = kept["train_mode"], kept["reinit_head"]
  c.init_from.path, c.init_from.pretrained = source, False
  c.optimizer.lr = lr
  c.schedule.warmup_epochs = 0.5
  return c


def deit_distillation(c):
  """DeiT's hard distillation (main.py --distillation-type hard, alpha 0.5, tau 1) from RegNetY-16GF with DeiT's
  released weights (regnety_160-a5fe301d.pth, the zoo's file)."""
  d = c.distillation
  d.type, d.alpha, d.tau = "hard", 0.5, 1.0
  d.teacher, d.teacher_overrides, d.teacher_weights = "regnety_160", {}, ""
  return c


DISTILL_DEMO_TEACHER = dict(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2)


def distill_demo(c):
  """A demo's teacher: a tiny random ViT (smoke runs: the loss and the teacher step, in seconds per step);
  benchmarks/distill_demo.py replaces it with a trained demo model."""
  d = c.distillation
  d.teacher, d.teacher_overrides, d.teacher_weights = "deit_tiny_patch16_224", dict(DISTILL_DEMO_TEACHER), "random"
  return c
