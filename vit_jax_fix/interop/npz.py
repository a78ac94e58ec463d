"""Google ViT `.npz` checkpoints (google-research/vision_transformer and big_vision naming) into our ViT.

Names are read as timm's npz loader reads them (`_load_weights` in timm/models/vision_transformer.py, timm 1.0.31):
- prefix: `opt/target/` (old vit_jax train states), `params/` or `params/img/` (big_vision), or none;
- per block `Transformer/encoderblock_{i}/` (loop) or `Transformer/encoderblock/` with a leading layer axis
  (scanned, `scan_layers=True` in big_vision);
- block sub-modules: vit_jax `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`;
  big_vision `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`;
- kernels: conv HWIO -> OIHW, attention query/key/value (D, H, Dh) -> rows of `qkv` (3D, D), out (H, Dh, D)
  -> (D, D), Dense (in, out) -> (out, in); `Transformer/encoder_norm` -> `norm`, `head` -> `head`.
- position embedding: `Transformer/posembed_input/pos_embedding` (vit_jax: with the class slot) or
  `pos_embedding` (big_vision: patches only). A patches-only table loads into a class-slot model with a zero
  class slot, and a class slot loads into a patches-only model by folding it into `cls` (both exact). When
  the grid differs, the patch part is resized (`position.resize_pos_embed`, bilinear without antialias by
  default, as timm's npz loader).
Unsupported, with an error: a `pre_logits` representation layer, MAP heads, a different patch size.
`head_mode='reset'` keeps the model's own head (fine-tuning to another class count), initialised as
the official code does (trunc_normal std 0.02, zero bias).
"""
from __future__ import annotations

import math
import os

import numpy as np

from vit_jax_fix import errors
from vit_jax_fix.interop.position import resize_pos_embed

_STYLES = {  # (attention, second LayerNorm, MLP) sub-module names
    "vit_jax": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
_PREFIXES = ("opt/target/", "params/img/", "params/")


def _strip_prefix(npz: dict) -> dict:
  for prefix in _PREFIXES:
    if any(k.startswith(prefix) for k in npz):
      return {k[len(prefix):]: v for k, v in npz.items() if k.startswith(prefix)}
  return dict(npz)


def _blocks(w: dict) -> list[dict]:
  """Per-block {sub-name: array} from loop or scanned layouts."""
  loop = {}
  for k, v in w.items():
    if k.startswith("Transformer/encoderblock_"):
      idx, _, rest = k[len("Transformer/encoderblock_"):].partition("/")
      loop.setdefault(int(idx), {})[rest] = v
  if loop:
    return [loop[i] for i in range(len(loop))]
  scanned = {k[len("Transformer/encoderblock/"):]: v for k, v in w.items()
             if k.startswith("Transformer/encoderblock/")}
  if not scanned:
    return []
  depth = {np.shape(v)[0] for v in scanned.values()}
  if len(depth) != 1:
    raise errors.BadFileError(f"scanned encoderblock arrays disagree on the layer axis: {sorted(depth)}")
  return [{k: v[i] for k, v in scanned.items()} for i in range(depth.pop())]


def npz_to_torch_state_dict(npz: dict) -> tuple[dict, dict]:
  """({torch key: array} in the DeiT/timm ViT layout, info) from a Google ViT npz mapping.
  info: 'style' ('vit_jax' | 'big_vision'), 'scanned', 'pos_has_cls'."""
  w = _strip_prefix(npz)
  bad = [k for k in w if k.startswith(("pre_logits/", "MAPHead"))]
  if bad:
    raise errors.BadFileError(f"npz holds layers our ViT does not have: {sorted(set(k.split('/')[0] for k in bad))} "
                     f"(representation/pre-logits layer or attention-pooling head)")
  blocks = _blocks(w)
  if not blocks:
    raise errors.BadFileError("no Transformer/encoderblock_* or Transformer/encoderblock/ arrays: not a ViT npz")
  style = "vit_jax" if any(k.startswith(_STYLES["vit_jax"][0]) for k in blocks[0]) else "big_vision"
  att, ln2, mlp = _STYLES[style]
  sd = {}
  kernel = np.asarray(w["embedding/kernel"])
  sd["patch_embed.proj.weight"] = kernel.transpose(3, 2, 0, 1)
  sd["patch_embed.proj.bias"] = np.asarray(w["embedding/bias"])
  sd["cls_token"] = np.asarray(w["cls"]).reshape(1, 1, -1)
  if "Transformer/posembed_input/pos_embedding" in w:
    pos, pos_has_cls = np.asarray(w["Transformer/posembed_input/pos_embedding"]), True
  elif "pos_embedding" in w:
    pos, pos_has_cls = np.asarray(w["pos_embedding"]), False
  else:
    raise errors.BadFileError("npz has no position embedding (Transformer/posembed_input/pos_embedding or "
                              "pos_embedding)")
  sd["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
  for i, b in enumerate(blocks):
    p = f"blocks.{i}."
    sd[p + "norm1.weight"], sd[p + "norm1.bias"] = b["LayerNorm_0/scale"], b["LayerNorm_0/bias"]
    d = np.shape(b[f"{att}/query/kernel"])[0]
    sd[p + "attn.qkv.weight"] = np.concatenate(
        [np.asarray(b[f"{att}/{n}/kernel"]).reshape(d, -1).T for n in ("query", "key", "value")])
    sd[p + "attn.qkv.bias"] = np.concatenate(
        [np.asarray(b[f"{att}/{n}/bias"]).reshape(-1) for n in ("query", "key", "value")])
    sd[p + "attn.proj.weight"] = np.asarray(b[f"{att}/out/kernel"]).reshape(-1, d).T
    sd[p + "attn.proj.bias"] = np.asarray(b[f"{att}/out/bias"])
    sd[p + "norm2.weight"], sd[p + "norm2.bias"] = b[f"{ln2}/scale"], b[f"{ln2}/bias"]
    for j in (0, 1):
      sd[p + f"mlp.fc{j + 1}.weight"] = np.asarray(b[f"{mlp}/Dense_{j}/kernel"]).T
      sd[p + f"mlp.fc{j + 1}.bias"] = np.asarray(b[f"{mlp}/Dense_{j}/bias"])
  sd["norm.weight"] = w["Transformer/encoder_norm/scale"]
  sd["norm.bias"] = w["Transformer/encoder_norm/bias"]
  if "head/kernel" in w:
    sd["head.weight"], sd["head.bias"] = np.asarray(w["head/kernel"]).T, np.asarray(w["head/bias"])
  sd = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}
  return sd, {"style": style, "scanned": not any(k.startswith("Transformer/encoderblock_") for k in w),
              "pos_has_cls": pos_has_cls}


def fit_pos_embed(pos: np.ndarray, *, has_cls: bool, model_has_cls_slot: bool, cls_token: np.ndarray,
                  grid: tuple[int, int], method: str = "bilinear", antialias: bool = False):
  """(pos_embed, cls_token) for the model: class slot added (zero) / folded into cls, grid resized."""
  prefix = 1 if has_cls else 0
  pos = resize_pos_embed(pos, grid, num_prefix=prefix, method=method, antialias=antialias)
  if has_cls and not model_has_cls_slot:
    cls_token = cls_token + pos[:, :1]
    pos = pos[:, 1:]
  elif not has_cls and model_has_cls_slot:
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  return pos.astype(np.float32), cls_token


def load_npz(path_or_dict, name: str, overrides: dict | None = None, *, resize: str = "bilinear",
             antialias: bool = False, head_mode: str = "load"):
  """(model, info): `create_model(name, **overrides)` loaded from a Google ViT npz. num_classes defaults to
  the npz head's; the model's img_size decides the grid (the npz grid is resized to it)."""
  from vit_jax_fix.interop.state_dict import from_torch_state_dict, to_torch_state_dict
  from vit_jax_fix.interop.skeleton import skeleton
  from vit_jax_fix.interop.timm_models import full_kwargs
  if head_mode not in ("load", "reset"):
    raise errors.ArgumentError("head_mode must be 'load' or 'reset'")
  npz = dict(np.load(os.fspath(path_or_dict))) if not isinstance(path_or_dict, dict) else path_or_dict
  sd, info = npz_to_torch_state_dict(npz)
  overrides = dict(overrides or {})
  if head_mode == "load" and "head.weight" in sd:
    overrides.setdefault("num_classes", int(sd["head.weight"].shape[0]))
  kw = full_kwargs(name, **overrides)
  p = int(kw["patch_size"])
  if sd["patch_embed.proj.weight"].shape[2:] != (p, p):
    raise errors.BadFileError(f"npz patch size {sd['patch_embed.proj.weight'].shape[2:]} differs from the model's "
                     f"patch_size={p}; build the model with that patch size")
  img = kw["img_size"]
  img = tuple(img) if isinstance(img, (list, tuple)) else (img, img)
  grid = (img[0] // p, img[1] // p)
  sd["pos_embed"], sd["cls_token"] = fit_pos_embed(
      sd["pos_embed"], has_cls=info["pos_has_cls"], model_has_cls_slot=kw.get("pos_embed", "cls") == "cls",
      cls_token=sd["cls_token"], grid=grid, method=resize, antialias=antialias)
  model = skeleton(name, **overrides)
  if head_mode == "reset":
    # A fresh head as the official init: trunc_normal(std 0.02) kernel, zero bias.
    own = to_torch_state_dict(model)
    rng = np.random.default_rng(0)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    for k, v in own.items():
      if k.startswith("head."):
        sd[k] = (np.clip(rng.normal(size=v.shape), -2, 2) * 0.02 if k.endswith("weight") else np.zeros_like(v)
                 ).astype(np.float32)
  from_torch_state_dict(model, sd)
  info.update(name=name, overrides=overrides, layout="official", wrapper="", prefix="")
  return model, info


def to_npz_dict(model, *, style: str = "vit_jax", scanned: bool = False, prefix: str = "") -> dict:
  """The Google npz naming of a plain ViT (the inverse of `npz_to_torch_state_dict`): for tests, and to hand
  weights to JAX code that reads vit_jax / big_vision checkpoints."""
  from vit_jax_fix.interop.state_dict import to_torch_state_dict
  if style not in _STYLES:
    raise errors.ArgumentError(f"style must be one of {sorted(_STYLES)}")
  att, ln2, mlp = _STYLES[style]
  sd = to_torch_state_dict(model)
  d = sd["cls_token"].shape[-1]
  heads = model.blocks[0].attn.num_heads
  out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
  has_cls = getattr(model, "pos_embed_mode", "cls") == "cls"
  if style == "vit_jax":
    pos = sd["pos_embed"] if has_cls else np.concatenate([np.zeros_like(sd["pos_embed"][:, :1]),
                                                          sd["pos_embed"]], 1)
    out["Transformer/posembed_input/pos_embedding"] = pos
  else:
    if has_cls:  # big_vision has no class slot: fold it into cls
      out["cls"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    out["pos_embedding"] = sd["pos_embed"][:, 1:] if has_cls else sd["pos_embed"]
  if "head.weight" in sd:
    out["head/kernel"], out["head/bias"] = sd["head.weight"].T, sd["head.bias"]
  blocks = []
  for i in range(len(model.blocks)):
    p = f"blocks.{i}."
    b = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
         f"{ln2}/scale": sd[p + "norm2.weight"], f"{ln2}/bias": sd[p + "norm2.bias"]}
    qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      b[f"{att}/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
      b[f"{att}/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, d // heads)
    b[f"{att}/out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(heads, d // heads, d)
    b[f"{att}/out/bias"] = sd[p + "attn.proj.bias"]
    for j in (0, 1):
      b[f"{mlp}/Dense_{j}/kernel"] = sd[p + f"mlp.fc{j + 1}.weight"].T
      b[f"{mlp}/Dense_{j}/bias"] = sd[p + f"mlp.fc{j + 1}.bias"]
    blocks.append(b)
  if scanned:
    for k in blocks[0]:
      out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}
