"""DeiT III ViT-S (deit_small_patch16_LS) on ImageNet-1k, DeiT III recipe.

  python main.py --config configs/deit3_s.py --workdir /ckpt/deit3_s
Reproduces: 81.4% top-1 (README_revenge, 800 epochs). Batch 2048, LAMB lr 4e-3 (unscaled), wd 0.05, grad clip
1.0, warm-up 5 epochs, cosine to 1e-5, BCE on binarised mixup 0.8 / cutmix 1.0 targets (smoothing 0), 3-Augment
+ RRC + flip, color jitter 0.3, no erasing, repeated augmentation, drop-path 0.05 constant, crop 1.0.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/deit3_s.py:demo --workdir /tmp/deit3_s_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_LS"
  c.model.overrides.drop_path_rate = 0.05
  common.deit3(c, batch=2048, lr=4e-3, epochs=800)
  if arg == "demo":
    return common.demo(c, {})
  return common.finish(c, arg)
