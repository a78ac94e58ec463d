"""Shunted-S (shunted_s) on ImageNet-1k, Shunted Transformer recipe.

  python main.py --config configs/shunted_s.py --workdir /ckpt/shunted_s
Reproduces: 82.9% top-1 (README). Batch 1024, AdamW lr 5e-4 x batch/512, wd 0.05, 300 epochs, warm-up 5,
cosine to 1e-5, DeiT augmentation, drop-path 0.2, no EMA.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/shunted_s.py:demo --workdir /tmp/shunted_s_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "shunted_s"
  c.model.overrides.drop_path_rate = 0.2
  c.optimizer.clip_grad_norm = 0.0
  c.ema.decay = 0.0
  if arg == "demo":
    return common.demo(c, common.SHUNTED_DEMO, replace=True)
  return common.finish(c, arg)
