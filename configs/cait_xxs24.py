"""CaiT-XXS24 (cait_XXS24_224) on ImageNet-1k, DeiT recipe with CaiT's constant drop-path.

  python main.py --config configs/cait_xxs24.py --workdir /ckpt/cait_xxs24
Reproduces: 77.6% top-1 (paper, distilled training; this config trains without distillation, so expect lower).
Batch 1024, 400 epochs, AdamW lr 5e-4 x batch/512, drop-path 0.05 constant, crop 1.0.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/cait_xxs24.py:demo --workdir /tmp/cait_xxs24_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "cait_XXS24_224"
  c.model.overrides.drop_path_rate = 0.05
  c.num_epochs = 400
  if arg == "demo":
    return common.demo(c, dict(class_attn_depth=2, talking_heads=True, layer_scale=1e-5, depth=4))
  return common.finish(c, arg)
