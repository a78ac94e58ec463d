"""AttnScale on DeiT-S, 12 blocks (attnscale_small_12), anti-oversmoothing recipe.

  python main.py --config configs/attnscale_s12.py --workdir /ckpt/attnscale_s12
Reproduces: 80.7% top-1 (reported; not confirmed from the paper, see anti_oversmoothing.md 8). DeiT recipe with
batch 1024 (lr 1e-3 scaled), 500 epochs (the official default), drop-path 0.1.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/attnscale_s12.py:demo --workdir /tmp/attnscale_s12_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "attnscale_small_12"
  c.model.overrides.drop_path_rate = 0.1
  c.num_epochs = 500
  if arg == "demo":
    return common.demo(c, dict(attn_scale=True))
  return common.finish(c, arg)
