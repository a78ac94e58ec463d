"""EViT on DeiT-S (deit_small_patch16_shrink_base, keep rate 0.7 at blocks 4, 7, 10, token fusion).

Fine-tune from DeiT-S (config argument ``finetune``; the README's zoo numbers):
  python main.py --config configs/evit_s.py:finetune --workdir /ckpt/evit_s_ft \
      --config.init_from.path=/weights/deit_small_patch16_224-cd65a155.pth
From scratch (default):
  python main.py --config configs/evit_s.py --workdir /ckpt/evit_s
Reproduces: 79.5% top-1 at keep rate 0.7 (README). From scratch: batch 2048, lr 5e-4 x batch/512 = 2e-3,
300 epochs. Fine-tune: 30 epochs, lr 2e-5 x batch/512 = 8e-5, no warm-up, min lr 2e-6, wd 1e-6, dropout and
drop-path off (train mode off), constant keep rate from step 0.
From scratch, the official keep-rate warm-up applies (config.keep_rate_schedule): keep rate 1 for 10 epochs,
then cosine down to 0.7 over 100 epochs, quantised to steps of 0.05, so the run compiles at most 7 train
steps (one per keep rate in {0.7, 0.75, ..., 1}); evaluation always runs at 0.7.

Demo (a few minutes on 2 CPU cores): python main.py --config configs/evit_s.py:demo --workdir /tmp/evit_s_demo
trains a small version of the same model on the embedded MNIST-5k (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_shrink_base"
  c.model.overrides.drop_path_rate = 0.1
  c.batch_size = 2048
  c.keep_rate_schedule.enabled = True
  c.keep_rate_schedule.start_epochs = 10
  c.keep_rate_schedule.ramp_epochs = 100
  if arg == "finetune":
    c.num_epochs = 30
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 1e-6
    c.schedule.warmup_epochs = 0
    c.schedule.min_lr = 2e-6
    c.train_mode = False
    c.ema.evaluate = False
    c.keep_rate_schedule.enabled = False
    return c
  if arg == "demo":   # 15 epochs: keep rate 1 for 1 epoch, then down to 0.7 over 5 (4 programs at 0.1)
    c = common.demo(c, dict(keep_rate=0.7, keep_rate_blocks=(2, 4), fuse_token=True))
    c.keep_rate_schedule.start_epochs, c.keep_rate_schedule.ramp_epochs = 1, 5
    c.keep_rate_schedule.granularity = 0.1
    return c
  return common.finish(c, arg)
