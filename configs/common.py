"""Shared pieces of the configs: the base config and the `demo` argument (small model, embedded MNIST-5k)."""
from vit_jax_fix.train.config import base_config


def base():
  return base_config()


DEMO_MODEL = dict(img_size=28, patch_size=4, embed_dim=128, depth=6, num_heads=4, drop_path_rate=0.0)


def demo(c, model_overrides=None, epochs: float = 30.0):
  """Turns a paper config into a CPU demo of the same model family on the embedded MNIST-5k."""
  c.model.overrides = dict(DEMO_MODEL, **(model_overrides or {}))
  c.data.dataset = "demo"
  c.data.image_size = 28
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
  c.batch_size = 128
  c.num_epochs = epochs
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.lr_batch_scale = 0
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_grad_norm = 1.0
  c.optimizer.grad_accum_steps = 1
  c.schedule.warmup_epochs = 2
  c.schedule.min_lr = 1e-5
  c.ema.decay = 0.999
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
    raise ValueError(f"unknown config argument {arg!r}: use '' (paper recipe) or 'demo'")
  return c
