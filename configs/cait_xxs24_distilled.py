"""CaiT-XXS24 (cait_XXS24_224) on ImageNet-1k with DeiT's hard distillation, as the CaiT paper trains it.

  python main.py --config configs/cait_xxs24_distilled.py --workdir /ckpt/cait_xxs24_distilled
Reproduces: 77.6% top-1 (paper, distilled training). The recipe of configs/cait_xxs24.py plus hard
distillation from RegNetY-16GF (regnety_160, DeiT's released teacher file), alpha 0.5, tau 1. CaiT has no
distillation token: its class-token head learns both the mixed targets and the teacher's arg-max
(train/distill.py).

Demo (CPU): python main.py --config configs/cait_xxs24_distilled.py:demo --workdir /tmp/cait_distilled_demo
trains a small CaiT on the embedded MNIST-5k with a random tiny teacher (see configs/deit_s_distilled.py).
"""
from configs import cait_xxs24, common


def get_config(arg: str = ""):
  c = cait_xxs24.get_config("demo" if arg == "demo" else "")
  common.deit_distillation(c)
  if arg == "demo":
    return common.distill_demo(c)
  return common.finish(c, arg)
