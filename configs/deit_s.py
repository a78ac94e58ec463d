"""DeiT-S (deit_small_patch16_224) on ImageNet-1k, DeiT recipe.

  python main.py --config configs/deit_s.py --workdir /ckpt/deit_s
Reproduces: 79.9% top-1 (README_deit; paper 79.8). Batch 1024, 300 epochs, AdamW lr 5e-4 x batch/512,
wd 0.05, warm-up 5 epochs from 1e-6, cosine to 1e-5, RandAugment m9, mixup 0.8 / cutmix 1.0, smoothing 0.1,
random erasing 0.25, repeated augmentation x3, drop-path 0.1, EMA 0.99996 (not used for the reported number).

Demo (a few minutes on 2 CPU cores): python main.py --config configs/deit_s.py:demo --workdir /tmp/deit_s_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_224"
  c.model.overrides.drop_path_rate = 0.1
  c.ema.evaluate = False
  if arg == "demo":
    return common.demo(c, {})
  return common.finish(c, arg)
