"""The official model names of every family, registered with their official configurations (into `spec.SPECS`;
look them up through `registry`, which imports this module).

Sources: the papers and the official code (each entry's `source` names the file; parameter counts and state-dict
keys are tested against listings of the official models, tests/data/state_dicts). Official repository @ commit:
- DeiT, CaiT, DeiT III (arXiv 2012.12877, 2103.17239, 2204.07118): facebookresearch/deit @ 7e160fe43f0252d1
- AugViT (arXiv 2106.15941): huawei-noah/Efficient-AI-Backbones @ f90e129b645c3b16, augvit_pytorch/
- DeepViT (arXiv 2103.11886): zhoudaquan/dvit_repo @ 1ccb152cea43fcbc
- AttnScale, FeatScale (arXiv 2203.05962): VITA-Group/ViT-Anti-Oversmoothing @ 989559fb256ef43b
- EViT (arXiv 2202.07800): youweiliang/evit @ 5ca95a7cf4a86371
- Shunted Transformer (arXiv 2111.15193): OliverRensu/Shunted-Transformer @ 6861101d8f4f592d
`paper_top1` is the ImageNet-1k top-1 the authors report for that name (README of the official repository).
"""
from __future__ import annotations

from vit_jax_fix.models.regnet import RegNet
from vit_jax_fix.models.shunted import ShuntedTransformer
from vit_jax_fix.models.spec import HALF, Weights, register, register_weights
from vit_jax_fix.models.vit import VisionTransformer

VIT = VisionTransformer
_DEIT = dict(patch_size=16, img_size=224, depth=12, mlp_ratio=4.0, qkv_bias=True, pos_embed="cls")
_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}

# --- DeiT (facebookresearch/deit models.py; timm VisionTransformer)
for size, top1 in (("tiny", 72.2), ("small", 79.9), ("base", 81.8)):
  d, h = _SIZES[size]
  register(f"deit_{size}_patch16_224", "deit", VIT, dict(_DEIT, embed_dim=d, num_heads=h),
           paper_top1=top1, source="facebookresearch/deit models.py")

# --- DeiT distilled (models.py DistilledVisionTransformer): + dist_token, pos_embed over N_p + 2, head_dist;
# trained by hard distillation from RegNetY-16GF (regnety_160); evaluation averages the two heads.
for size, top1 in (("tiny", 74.5), ("small", 81.2), ("base", 83.4)):
  d, h = _SIZES[size]
  register(f"deit_{size}_distilled_patch16_224", "deit", VIT, dict(_DEIT, embed_dim=d, num_heads=h, dist_token=True),
           paper_top1=top1, source="facebookresearch/deit models.py")

# --- DeiT III (models_v2.py): LayerScale 1e-4, pos_embed without the class slot, constant drop-path, crop 1.0
for size, top1 in (("small", 81.4), ("base", 83.8)):
  d, h = _SIZES[size]
  kw = dict(_DEIT, embed_dim=d, num_heads=h, pos_embed="patches", layer_scale=1e-4,
            drop_path_schedule="constant")
  register(f"deit_{size}_patch16_LS", "deit3", VIT, kw, crop_pct=1.0, paper_top1=top1,
           source="facebookresearch/deit models_v2.py")
  # timm's name for the same architecture (timm initialises LayerScale at 1e-6, drop-path linear).
  register(f"deit3_{size}_patch16_224", "deit3", VIT,
           dict(kw, layer_scale=1e-6, drop_path_schedule="linear"), crop_pct=1.0, paper_top1=top1,
           source="timm deit3 (alias of deit_*_patch16_LS)")

# --- CaiT (cait_models.py): talking heads, LayerScale, two class-attention blocks, crop 1.0
_CAIT = dict(patch_size=16, img_size=224, depth=24, mlp_ratio=4.0, qkv_bias=True, pos_embed="patches",
             talking_heads=True, layer_scale=1e-5, class_attn_depth=2, drop_path_schedule="constant")
_CAIT_SIZES = {"XXS24_224": (192, 4, 77.6), "S24_224": (384, 8, 83.5)}
for suffix, (d, h, top1) in _CAIT_SIZES.items():
  register(f"cait_{suffix}", "cait", VIT, dict(_CAIT, embed_dim=d, num_heads=h), crop_pct=1.0,
           paper_top1=top1, source="facebookresearch/deit cait_models.py")

# --- AugViT (huawei-noah/Efficient-AI-Backbones augvit_pytorch): mean = std = 0.5, crop 0.9
_AUG = dict(_DEIT, embed_dim=384, num_heads=6, num_cir=4)
for name, mode, kw, top1 in (
    ("augvit_small", None, {}, 79.8),
    ("augvit_small_linear", "linear", {}, None),
    ("augvit_small_circulant2", "circulant2", {}, 80.9),
    ("augvit_small_linear2", "linear2", {}, None),
    ("augvit_base_circulant2", "circulant2", dict(embed_dim=768, num_heads=12), 82.4)):
  register(name, "augvit", VIT, dict(_AUG, aug_shortcut=mode, **kw), mean=HALF, std=HALF, crop_pct=0.9,
           paper_top1=top1, source="huawei-noah/Efficient-AI-Backbones augvit.py")

# --- DeepViT (zhoudaquan/dvit_repo): D 384, 12 heads (Dh 32), mlp 3; mean = std = 0.5, crop 0.9
_DVIT = dict(_DEIT, embed_dim=384, num_heads=12, mlp_ratio=3.0, reattention=True)
for depth, top1 in ((16, 79.10), (24, 79.99), (32, 80.90)):
  register(f"deepvit_patch16_224_re_attn_{depth}b", "deepvit", VIT, dict(_DVIT, depth=depth), mean=HALF,
           std=HALF, crop_pct=0.9, paper_top1=top1, source="zhoudaquan/dvit_repo deep_vision_transformer.py")
register("deepvit_S", "deepvit", VIT,
         dict(_DVIT, embed_dim=396, depth=16, stem="cnn", reattention="last:5", reattention_scale=True,
              scale_adjustment=0.5), mean=HALF, std=HALF, crop_pct=0.9, paper_top1=82.3,
         source="zhoudaquan/dvit_repo deep_vision_transformer.py")
register("deepvit_L", "deepvit", VIT,
         dict(_DVIT, embed_dim=420, depth=32, stem="cnn", reattention="last:12", scale_adjustment=0.5),
         mean=HALF, std=HALF, crop_pct=0.9, paper_top1=83.1,
         source="zhoudaquan/dvit_repo deep_vision_transformer.py")

# --- Anti-oversmoothing (VITA-Group/ViT-Anti-Oversmoothing): AttnScale / FeatScale on DeiT-S and CaiT
_AO = "VITA-Group/ViT-Anti-Oversmoothing"
for depth, top1_a, top1_f in ((12, 80.7, 80.9), (24, 81.1, 81.3)):
  base = dict(_DEIT, embed_dim=384, num_heads=6, depth=depth)
  register(f"attnscale_small_{depth}", "ao", VIT, dict(base, attn_scale=True), paper_top1=top1_a,
           source=f"{_AO} attnscale.py")
  register(f"featscale_small_{depth}", "ao", VIT, dict(base, feat_scale="double"), paper_top1=top1_f,
           source=f"{_AO} featscale.py")
for suffix, (d, h, _) in _CAIT_SIZES.items():
  base = dict(_CAIT, embed_dim=d, num_heads=h)
  register(f"attnscale_cait_{suffix}", "cait", VIT, dict(base, attn_scale=True), crop_pct=1.0,
           source=f"{_AO} attnscale_cait.py")
  register(f"featscale_cait_{suffix}", "cait", VIT, dict(base, feat_scale="single"), crop_pct=1.0,
           source=f"{_AO} featscale_cait.py")

# --- EViT (youweiliang/evit): DeiT + token reorganisation at blocks 3, 6, 9; fusion on, as the scripts run it
for size, top1 in (("small", 79.5), ("base", 81.3)):
  d, h = _SIZES[size]
  register(f"deit_{size}_patch16_shrink_base", "evit", VIT,
           dict(_DEIT, embed_dim=d, num_heads=h, keep_rate=0.7, keep_rate_blocks=(3, 6, 9), fuse_token=True),
           paper_top1=top1, source="youweiliang/evit evit.py")

# --- Shunted Transformer (OliverRensu/Shunted-Transformer SSA.py): constructors shunted_t / shunted_s / shunted_b
_SHUNTED = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), mlp_ratios=(8, 8, 4, 4),
                sr_ratios=(8, 4, 2, 1), qkv_bias=True, qk_scale=None, norm_eps=1e-6, patch_size=4, img_size=224)
for name, depths, num_conv, top1 in (("shunted_t", (1, 2, 4, 1), 0, 79.8), ("shunted_s", (2, 4, 12, 1), 1, 82.9),
                                     ("shunted_b", (3, 4, 24, 2), 2, 84.0)):
  register(name, "shunted", ShuntedTransformer, dict(_SHUNTED, depths=depths, num_conv=num_conv),
           crop_pct=0.875, paper_top1=top1, source=f"OliverRensu/Shunted-Transformer SSA.py :: {name}")

# --- RegNetY-16GF (Radosavovic et al. 2020), DeiT's distillation teacher: timm's regnety_160 (RegNetCfg w0 200,
# wa 106.23, wm 2.48, group width 112, 18 blocks, SE 0.25), whose keys DeiT's released teacher file has.
register("regnety_160", "regnet", RegNet, dict(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25),
         source="timm regnet.py :: regnety_160 (teacher of facebookresearch/deit main.py --teacher-model)")

# --- Released weights (registry.Weights): URL as the authors publish it, the file name it is cached (and
# mirrored) under, the key layout load_torch reads it with, and the sha256 prefix where the file name
# carries one (torch.hub's `-<hex>` convention). Names without a row have no released weights: AugViT (none
# published), DeepViT 16b (never released), AO 24-layer and CaiT-S24 variants, EViT-DeiT-B.
# Browser-only links (Google Drive, Baidu) are listed so that the error says where to get the file by hand.
_FB = "https://dl.fbaipublicfiles.com/deit/"
_HF_AO = "https://huggingface.co/peihaowang/vit-anti-oversmoothing/resolve/main/"
_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_SHUNTED_DRIVE = "https://drive.google.com/drive/folders/15iZKXFT7apjUSoN2WUMAbb0tvJgyh3YP?usp=sharing"
_SHUNTED_NOTE = ("from the Drive folder, or Baidu Pan https://pan.baidu.com/s/1a9nVWpw2SzP0csCBCF8DNw with code "
                 "hazr")
_DEIT3_NOTE = "DeiT III ImageNet-1k weights (official gamma_1/gamma_2 keys; timm's deit3 files are renamed copies)"
_WEIGHTS = {
    # DeiT: README_deit.md model zoo; the file names carry a sha256 prefix (torch.hub check_hash).
    "deit_tiny_patch16_224": Weights(_FB + "deit_tiny_patch16_224-a1311bcf.pth", "deit_tiny_patch16_224-a1311bcf.pth",
                                     sha256="a1311bcf", source="facebookresearch/deit README_deit.md"),
    "deit_small_patch16_224": Weights(_FB + "deit_small_patch16_224-cd65a155.pth",
                                      "deit_small_patch16_224-cd65a155.pth", sha256="cd65a155",
                                      source="facebookresearch/deit README_deit.md"),
    "deit_base_patch16_224": Weights(_FB + "deit_base_patch16_224-b5f2ef4d.pth", "deit_base_patch16_224-b5f2ef4d.pth",
                                     sha256="b5f2ef4d", source="facebookresearch/deit README_deit.md"),
    **{f"deit_{size}_distilled_patch16_224": Weights(_FB + f"deit_{size}_distilled_patch16_224-{h}.pth",
                                                     f"deit_{size}_distilled_patch16_224-{h}.pth", sha256=h,
                                                     source="facebookresearch/deit README_deit.md")
       for size, h in (("tiny", "b40b3cf7"), ("small", "649709d9"), ("base", "df68dfff"))},
    # DeiT's teacher, the file main.py --teacher-path reads ({'model': state_dict}, timm's regnety_160 keys).
    "regnety_160": Weights(_FB + "regnety_160-a5fe301d.pth", "regnety_160-a5fe301d.pth", layout="timm",
                           sha256="a5fe301d", source="facebookresearch/deit README_deit.md (teacher)",
                           note="RegNetY-16GF trained by the DeiT authors, the teacher of the distilled models"),
    # CaiT: README_cait.md (S24 224); XXS24 224 is published in cait_models.py (cait_XXS24_224, pretrained=True).
    "cait_S24_224": Weights(_FB + "S24_224.pth", "S24_224.pth", source="facebookresearch/deit README_cait.md",
                            note="keys carry a 'module.' prefix (stripped on load)"),
    "cait_XXS24_224": Weights(_FB + "XXS24_224.pth", "XXS24_224.pth", source="facebookresearch/deit cait_models.py",
                              note="keys carry a 'module.' prefix (stripped on load)"),
    # AttnScale / FeatScale: the README points to the Hugging Face hub repository; files at its root.
    **{n: Weights(_HF_AO + f, f, source="VITA-Group/ViT-Anti-Oversmoothing README.md (Hugging Face hub)")
       for n, f in (("attnscale_small_12", "attnscale_small_12.pth"), ("featscale_small_12", "featscale_small_12.pth"),
                    ("attnscale_cait_XXS24_224", "attnscale_cait_xxs24_224.pth"),
                    ("featscale_cait_XXS24_224", "featscale_cait_xxs24_224.pth"))},
    # EViT: README model zoo, Google Drive only; the registered name is the keep-rate 0.7, fused-token row.
    "deit_small_patch16_shrink_base": Weights(
        _DRIVE.format("1FfvdEBss9f8gexjqEY8vOSUQe_8qwYuL"), "evit_deit_small_keep0.7_fuse.pth",
        source="youweiliang/evit README.md",
        note="the keep rate 0.7, token fusion row; the file pickles argparse args: load it with "
             "allow_pickle=True (trusted source) or re-save its 'model' entry"),
    # DeepViT: README tables, Google Drive only (16b: never released).
    "deepvit_patch16_224_re_attn_24b": Weights(_DRIVE.format("1lPmKdNMPJq-mq-4FivqIY4JNAPoQHYxV"),
                                               "deepvit_patch16_224_re_attn_24b.pth",
                                               source="zhoudaquan/dvit_repo README.md"),
    "deepvit_patch16_224_re_attn_32b": Weights(_DRIVE.format("1kUBrAbAQfMT5FQJprITRxDtOE6ECZM0M"),
                                               "deepvit_patch16_224_re_attn_32b.pth",
                                               source="zhoudaquan/dvit_repo README.md",
                                               note="this link was reported dead (dvit_repo issue #10)"),
    "deepvit_S": Weights(_DRIVE.format("1evhBjla4Nth7LawW2PAXnGEcpv3YBWEC"), "deepvit_S.pth",
                         source="zhoudaquan/dvit_repo README.md"),
    "deepvit_L": Weights(_DRIVE.format("1MTRm0NK_sPGRSyuD_hHJ1Zgw2diEaKLR"), "deepvit_L.pth",
                         source="zhoudaquan/dvit_repo README.md"),
    # Shunted: one Google Drive folder (and Baidu Pan) for T, S and B.
    **{n: Weights(_SHUNTED_DRIVE, f, source="OliverRensu/Shunted-Transformer README.md", note=f"{f} {_SHUNTED_NOTE}")
       for n, f in (("shunted_t", "ckpt_T.pth"), ("shunted_s", "ckpt_S.pth"), ("shunted_b", "ckpt_B.pth"))},
}
# DeiT III: README_revenge.md (ImageNet-1k pre-training, 224); timm's deit3_* names are the same architecture.
for _size in ("small", "base"):
  _w = Weights(_FB + f"deit_3_{_size}_224_1k.pth", f"deit_3_{_size}_224_1k.pth",
               source="facebookresearch/deit README_revenge.md", note=_DEIT3_NOTE)
  _WEIGHTS[f"deit_{_size}_patch16_LS"] = _WEIGHTS[f"deit3_{_size}_patch16_224"] = _w
for _name, _w in _WEIGHTS.items():
  register_weights(_name, _w)
