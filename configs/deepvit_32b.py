"""DeepViT-32B (deepvit_patch16_224_re_attn_32b): re-attention with BatchNorm over heads.

  python main.py --config configs/deepvit_32b.py --workdir /ckpt/deepvit_32b
Reproduces: 80.90% top-1 (README). Recipe (scripts/*.yaml): AdamW lr 5e-4 (unscaled), wd 0.05, 300 epochs
+ 10 cooldown at min lr (timm's train.py schedule), warm-up 5, RandAugment m9, mixup 0.8 / cutmix 1.0 (32B: 0.1 / 0),
smoothing 0.1, erasing 0.25, no repeated augmentation, drop-path 0.2, EMA 0.99996 (evaluated), BatchNorm
re-calibration (50 batches of 256 train images, eval transforms) before every evaluation. The global batch is
not recorded; 256 x 32 GPUs would be a guess, so batch 1024 is used here.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/deepvit_32b.py:demo --workdir /tmp/deepvit_32b_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  return common.deepvit(32, arg)
