"""EViT-S at 272 px fine-tuned from DeiT-S 224 px weights: more tokens at DeiT-S's cost (EViT's second claim).

  python main.py --config configs/evit_s_272.py --workdir /ckpt/evit_s_272 \
      --config.init_from.path=/weights/deit_small_patch16_224-cd65a155.pth
At 272 px DeiT-S sees 17 x 17 = 289 patches; EViT keeps 70% of the attentive tokens at blocks 4, 7 and 10 and
fuses the rest (deit_small_patch16_shrink_base), so the forward costs about what DeiT-S costs at 224 px
(the authors' registered 272 px variant: 4.56 vs 4.6 GMACs; abstract: "+1% top-1 at the same computational
cost"). pos_embed is resized bicubically from 14 x 14 to 17 x 17 (train/finetune.py). Recipe: EViT's
fine-tuning (finetune.sh, as configs/evit_s.py:finetune): 30 epochs, batch 2048, lr 2e-5 x batch/512 = 8e-5,
no warm-up, cosine to 2e-6, weight decay 1e-6, training mode off (no dropout or drop-path), the keep rate
constant from step 0.

Demo (CPU; run configs/deit_s.py:demo first, at 28 px):
  python main.py --config configs/deit_s.py:demo --workdir /tmp/deit_s_demo
  python main.py --config configs/evit_s_272.py:demo --workdir /tmp/evit_s_272_demo
fine-tunes the DeiT demo model at 42 px (36 patches instead of 16) with keep rate 0.7 at blocks 2 and 4.
"""
from configs import common, evit_s


def get_config(arg: str = ""):
  c = evit_s.get_config("finetune")        # EViT's fine-tuning recipe, at 272 px
  c.data.image_size = 272
  if arg == "demo":
    c = common.finetune_demo(c, dict(keep_rate=0.7, keep_rate_blocks=(2, 4), fuse_token=True), image_size=42,
                             source="/tmp/deit_s_demo")
    c.schedule.warmup_epochs = 0
    return c
  return common.finish(c, arg)
