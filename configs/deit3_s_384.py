"""DeiT III ViT-S fine-tuned at 384 px from its 224 px ImageNet-1k weights (README_revenge: S-384 83.4% top-1).

  python main.py --config configs/deit3_s_384.py --workdir /ckpt/deit3_s_384
Starts from the authors' 224 px weights of deit_small_patch16_LS (init_from.pretrained: downloaded once into
the cache); pos_embed is resized bicubically from 14 x 14 to 24 x 24 patches as PyTorch does
(train/finetune.py). Recipe: DeiT III's fine-tuning at a new resolution (README_revenge's command, given for
ViT-B 192 -> 224 px): 20 epochs, AdamW lr 1e-5 (unscaled), batch 512, weight decay 0.1, warm-up 5 epochs,
soft-target cross-entropy with label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1,
no repeated augmentation, no random erasing, crop 1.0; drop-path 0.05 (ViT-S's pretraining rate: the README
gives 0.2 for ViT-B only), EMA kept but not evaluated. Set --config.optimizer.layer_decay=0.65 for BEiT-style
layer-wise decay (not in the DeiT III recipe).

Demo (CPU; run configs/deit3_s.py:demo first, at 28 px):
  python main.py --config configs/deit3_s.py:demo --workdir /tmp/deit3_s_demo
  python main.py --config configs/deit3_s_384.py:demo --workdir /tmp/deit3_s_384_demo
fine-tunes that demo model at 42 px (6 x 6 patches instead of 4 x 4: 384/224 in miniature) for 3 epochs.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.paper_base()
  c.model.name = "deit_small_patch16_LS"
  c.model.overrides.drop_path_rate = 0.05
  c.model.overrides.drop_path_schedule = "constant"
  c.data.image_size = 384
  c.data.augment = "deit"
  c.data.rand_augment = "rand-m9-mstd0.5-inc1"
  c.data.reprob = 0.0
  c.data.repeated_aug = 1
  c.data.crop_pct = 1.0
  c.data.label_smoothing = 0.1
  c.loss = "softmax_ce"
  c.batch_size = 512
  c.num_epochs = 20
  c.optimizer.lr = 1e-5
  c.optimizer.lr_batch_scale = 0
  c.optimizer.weight_decay = 0.1
  c.schedule.warmup_epochs = 5
  c.ema.evaluate = False
  c.init_from.pretrained = True
  if arg == "demo":
    return common.finetune_demo(c, image_size=42, source="/tmp/deit3_s_demo")
  return common.finish(c, arg)
