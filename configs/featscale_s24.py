"""FeatScale on DeiT-S, 24 blocks (featscale_small_24).

  python main.py --config configs/featscale_s24.py --workdir /ckpt/featscale_s24
Reproduces: 81.3% top-1 (reported; not confirmed from the paper). Batch 512, 500 epochs, dropout 0.2,
drop-path 0.1.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/featscale_s24.py:demo --workdir /tmp/featscale_s24_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "featscale_small_24"
  c.model.overrides.drop_path_rate = 0.1
  c.model.overrides.drop_rate = 0.2
  c.batch_size = 512
  c.num_epochs = 500
  if arg == "demo":
    return common.demo(c, dict(feat_scale="double"))
  return common.finish(c, arg)
