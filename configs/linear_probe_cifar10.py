"""Linear probe: DeiT-S (ImageNet-1k weights) frozen, a new CIFAR-10 head trained on its pre-logits.

  python main.py --config configs/linear_probe_cifar10.py --workdir /ckpt/deit_s_probe_cifar10
optimizer.freeze = '(?!head/).*' freezes every parameter but the head (train/transfer.py: no updates, no
optimizer state, EMA untouched; bit-identical after training), the backbone runs in eval mode (train_mode
False: no drop-path, the features are the ones a frozen model gives) and the head is re-initialised for 10
classes (reinit_head 'auto': 1000 -> 10). AdamW lr 1e-3 (unscaled), no weight decay, batch 512, 20 epochs,
warm-up 1, light augmentation (random-resized crop + flip; no RandAugment, mixing or smoothing), no EMA.
The closed-form alternative, per block and without training: python -m vit_jax_fix.diagnose --probe
(diagnostics/probe.py).

Demo (CPU; run configs/deit_s.py:demo first):
  python main.py --config configs/deit_s.py:demo --workdir /tmp/deit_s_demo
  python main.py --config configs/linear_probe_cifar10.py:demo --workdir /tmp/probe_demo
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_224"
  c.data.dataset = "cifar10"
  c.data.image_size = 224
  c.data.crop_pct = 1.0
  c.data.rand_augment = ""
  c.data.color_jitter = 0.0
  c.data.reprob = 0.0
  c.data.repeated_aug = 1
  c.data.mixup = 0.0
  c.data.cutmix = 0.0
  c.data.label_smoothing = 0.0
  c.batch_size = 512
  c.num_epochs = 20
  c.optimizer.lr = 1e-3
  c.optimizer.lr_batch_scale = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.freeze = "(?!head/).*"
  c.schedule.warmup_epochs = 1
  c.train_mode = False
  c.ema.decay = 0.0
  c.init_from.pretrained = True
  if arg == "demo":
    c = common.finetune_demo(c, image_size=28, source="/tmp/deit_s_demo", lr=1e-3)
    c.optimizer.weight_decay, c.ema.decay, c.data.label_smoothing = 0.0, 0.0, 0.0
    return c
  return common.finish(c, arg)
