"""EViT on DeiT-S (deit_small_patch16_shrink_base, keep rate 0.7 at blocks 4, 7, 10, token fusion).

Fine-tune from DeiT-S (config argument ``finetune``; the README's zoo numbers):
  python main.py --config configs/evit_s.py:finetune --workdir /ckpt/evit_s_ft \
      --config.init_from.path=/weights/deit_small_patch16_224-cd65a155.pth
From scratch (default):
  python main.py --config configs/evit_s.py --workdir /ckpt/evit_s
Reproduces: 79.5% top-1 at keep rate 0.7 (README). From scratch: batch 2048, lr 5e-4 x batch/512 = 2e-3,
300 epochs. Fine-tune: 30 epochs, lr 2e-5 x batch/512 = 8e-5, no warm-up, min lr 2e-6, wd 1e-6, dropout and
drop-path off (train mode off), constant keep rate from step 0.
The keep-rate warm-up of the from-scratch recipe (1 for 10 epochs, cosine to 0.7 over 100) needs a
step-dependent token count, which this trainer does not apply yet: the keep rate is constant.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/evit_s.py:demo --workdir /tmp/evit_s_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_shrink_base"
  c.model.overrides.drop_path_rate = 0.1
  c.batch_size = 2048
  if arg == "finetune":
    c.num_epochs = 30
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 1e-6
    c.schedule.warmup_epochs = 0
    c.schedule.min_lr = 2e-6
    c.train_mode = False
    c.ema.evaluate = False
    return c
  if arg == "demo":
    return common.demo(c, dict(keep_rate=0.7, keep_rate_blocks=(2, 4), fuse_token=True))
  return common.finish(c, arg)
