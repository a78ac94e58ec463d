"""AugViT-S (augvit_small_circulant2) on ImageNet-1k with the AugViT recipe (timm 0.3.x / DeiT pipeline).

  python main.py --config configs/augvit_s.py --workdir /ckpt/augvit_s
Reproduces: 80.9% top-1 (paper Table 2; DeiT-S baseline 79.8). Recipe: global batch 1024, 300 epochs, AdamW
lr 1e-3 (unscaled), wd 0.05, warm-up 5 epochs from 1e-6, cosine to 1e-5, RandAugment m9, mixup 0.8 / cutmix
1.0, smoothing 0.1, random erasing 0.25, repeated augmentation, drop-path 0.1, EMA 0.99996, mean = std = 0.5.
As the official timm train.py: the cosine over 300 epochs stepped per epoch (epoch e at timm's value for e),
then 10 cooldown epochs at min lr (310 epochs run).

Demo (a few minutes on 2 CPU cores; the README's first command):
  python main.py --config configs/augvit_s.py:demo --workdir /tmp/augvit_demo
The same model family (augmented circulant shortcuts) at depth 6, dim 128, 28 px, patch 7 on the embedded
MNIST-5k (4,500 train / 500 test). Measured by CI's main job on a fresh clone (2-core CPU): 94.6% top-1
(EMA 94.8%) after 15 epochs (525 steps of 128), 1 min 52 s of training (DEMO_RESULT below).
"""
from configs import common

DEMO_RESULT = "94.6% top-1 (500 held-out digits), 525 steps (15 epochs), 1 min 52 s of training on 2 CPU cores"


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "augvit_small_circulant2"
  c.data.interpolation = "random"
  c.data.color_jitter = 0.4
  c.model.overrides.drop_path_rate = 0.1
  c.batch_size = 1024
  c.num_epochs = 300
  c.optimizer.lr = 1e-3
  c.optimizer.lr_batch_scale = 0
  c.ema.decay = 0.99996
  common.timm_train_py(c)
  if arg == "demo":
    return common.demo(c, dict(aug_shortcut="circulant2"))
  return common.finish(c, arg)
