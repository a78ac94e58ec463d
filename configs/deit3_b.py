"""DeiT III ViT-B (deit_base_patch16_LS) on ImageNet-1k, DeiT III recipe, 192 px pre-training stage.

  python main.py --config configs/deit3_b.py --workdir /ckpt/deit3_b
Reproduces (with the 20-epoch 224 px fine-tune: init_from this workdir, data.image_size=224, AdamW lr 1e-5,
wd 0.1, smoothing 0.1 soft-target CE, RandAugment): 83.8% top-1 (README_revenge). Batch 2048, LAMB lr 3e-3,
800 epochs at 192 px, drop-path 0.2 constant.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/deit3_b.py:demo --workdir /tmp/deit3_b_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_base_patch16_LS"
  c.model.overrides.drop_path_rate = 0.2
  common.deit3(c, batch=2048, lr=3e-3, epochs=800)
  c.data.image_size = 192
  if arg == "demo":
    return common.demo(c, {})
  return common.finish(c, arg)
