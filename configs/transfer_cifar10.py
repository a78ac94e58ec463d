"""DeiT-S (ImageNet-1k weights) fine-tuned on CIFAR-10 with a new head: transfer to a tfds dataset.

  python main.py --config configs/transfer_cifar10.py --workdir /ckpt/deit_s_cifar10
The authors' DeiT-S weights (init_from.pretrained) with a new 10-class head (init_from.reinit_head 'auto':
the class count differs), CIFAR-10 from tfds (data.data_dir; `tfds build cifar10` once) upsampled from 32 to
224 px. A common transfer recipe, not a paper reproduction (DeiT reports 99.1% for DeiT-B at 384 px): batch
512, AdamW lr 1e-4 (unscaled), weight decay 0.05, 30 epochs, warm-up 3, layer-wise lr decay 0.75
(optimizer.layer_decay: the head at 1e-4, the patch embedding at 0.75^13 of it), drop-path 0.1, RandAugment
m9, mixup 0.8 / cutmix 1.0, smoothing 0.1, no repeated augmentation or random erasing, crop 1.0. Another
dataset: --config.data.dataset=oxford_flowers102 (the class count is read from the data; the head follows).

Demo (CPU; run configs/deit_s.py:demo first):
  python main.py --config configs/deit_s.py:demo --workdir /tmp/deit_s_demo
  python main.py --config configs/transfer_cifar10.py:demo --workdir /tmp/transfer_demo
the same transfer keys (layer decay) on the embedded MNIST-5k from the DeiT demo model (the same 10
classes: its head is kept; a source with another class count gets a new one).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_224"
  c.model.overrides.drop_path_rate = 0.1
  c.data.dataset = "cifar10"
  c.data.image_size = 224
  c.data.crop_pct = 1.0
  c.data.reprob = 0.0
  c.data.repeated_aug = 1
  c.batch_size = 512
  c.num_epochs = 30
  c.optimizer.lr = 1e-4
  c.optimizer.lr_batch_scale = 0
  c.optimizer.layer_decay = 0.75
  c.schedule.warmup_epochs = 3
  c.ema.evaluate = False
  c.init_from.pretrained = True
  if arg == "demo":
    return common.finetune_demo(c, image_size=28, source="/tmp/deit_s_demo", lr=5e-4)
  return common.finish(c, arg)
