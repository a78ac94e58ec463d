"""Shunted-B (shunted_b) on ImageNet-1k, Shunted Transformer recipe.

  python main.py --config configs/shunted_b.py --workdir /ckpt/shunted_b
Reproduces: 84.0% top-1 (README). Batch 1024, AdamW lr 5e-4 x batch/512, wd 0.05, 300 epochs, warm-up 5,
cosine to 1e-5, DeiT augmentation, drop-path 0.3, gradient clipping 1.0, no EMA.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/shunted_b.py:demo --workdir /tmp/shunted_b_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "shunted_b"
  c.model.overrides.drop_path_rate = 0.3
  c.optimizer.clip_grad_norm = 1.0
  c.ema.decay = 0.0
  if arg == "demo":
    return common.demo(c, common.SHUNTED_DEMO, replace=True)
  return common.finish(c, arg)
