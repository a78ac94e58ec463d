"""FeatScale on DeiT-S, 12 blocks (featscale_small_12).

  python main.py --config configs/featscale_s12.py --workdir /ckpt/featscale_s12
Reproduces: 80.9% top-1 (the abstract's "+1.1%" over DeiT-S 79.8). Batch 1024, 500 epochs, drop-path 0.1.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/featscale_s12.py:demo --workdir /tmp/featscale_s12_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "featscale_small_12"
  c.model.overrides.drop_path_rate = 0.1
  c.num_epochs = 500
  if arg == "demo":
    return common.demo(c, dict(feat_scale="double"))
  return common.finish(c, arg)
