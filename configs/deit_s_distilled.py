"""DeiT-S distilled (deit_small_distilled_patch16_224) on ImageNet-1k: the DeiT recipe + hard distillation.

  python main.py --config configs/deit_s_distilled.py --workdir /ckpt/deit_s_distilled
Reproduces: 81.2% top-1 (README_deit, distilled; the evaluation averages the class and distillation heads).
The DeiT-S recipe of configs/deit_s.py, plus DeiT's hard distillation (main.py --distillation-type hard,
alpha 0.5, tau 1): the distillation head learns the arg-max of the teacher RegNetY-16GF (regnety_160, DeiT's
released file regnety_160-a5fe301d.pth, fetched and cached on first use), run frozen on the same mixed images.

Demo (CPU): python main.py --config configs/deit_s_distilled.py:demo --workdir /tmp/deit_s_distilled_demo
trains a small distilled model on the embedded MNIST-5k (see configs/common.py) with a random tiny teacher;
give it a trained one with --config.distillation.teacher_weights=<workdir of configs/deit_s.py:demo>
--config.distillation.teacher=deit_small_patch16_224 and the demo's model overrides (common.distill_demo).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_distilled_patch16_224"
  c.model.overrides.drop_path_rate = 0.1
  c.ema.evaluate = False
  common.deit_distillation(c)
  if arg == "demo":
    return common.distill_demo(common.demo(c, {}))
  return common.finish(c, arg)
