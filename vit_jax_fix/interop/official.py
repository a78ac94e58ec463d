"""Build the model that an official constructor call builds.

`from_official_constructor(name, **kwargs)` takes a registered name and the keyword arguments of the official
class or constructor exactly as the golden JSON files write them (`constructor.kwargs`), including list-valued
arguments (DeepViT's per-block flags, EViT's per-block keep rates, Shunted's per-stage lists) and the
`{'$partial': 'torch.nn.LayerNorm', 'kwargs': {'eps': 1e-6}}` / `{'$module_attr': 'Name'}` encodings.

Every family is translated the same way, by three tables: `_FAMILY[family]` maps each official argument to
our clean names (an official argument not in it is an error), `_OFFICIAL_DEFAULTS[family]` holds the official
class's defaults where our registered names differ (so that arguments left out build what the official class
builds), and `_FINALIZE[family]` adjusts arguments that only make sense together (EViT's keep rates,
Shunted's `num_stages`).
"""
from __future__ import annotations

from typing import Any, Callable

from vit_jax_fix.models.registry import create_model, get_spec


_LAYER_NORM = ("torch.nn.LayerNorm", "nn.LayerNorm")


def _norm_layer(v):
  # functools.partial(LayerNorm, eps=...), or the class itself (torch's default eps 1e-5).
  if isinstance(v, dict) and v.get("$partial") in _LAYER_NORM:
    return {"norm_eps": float(v.get("kwargs", {}).get("eps", 1e-5))}
  if isinstance(v, dict) and v.get("$module_attr") in _LAYER_NORM + ("LayerNorm",):
    return {"norm_eps": 1e-5}
  raise ValueError(f"norm_layer={v!r}: only torch.nn.LayerNorm or functools.partial(torch.nn.LayerNorm, "
                   f"eps=...) is supported")


def _same(name):
  return lambda v: {name: v}


def _ignored(v):
  return {}


def _only(expected, what):
  def check(v):
    if v != expected:
      raise ValueError(f"official argument {what}={v!r} is not supported (only {expected!r})")
    return {}
  return check


def _depth(v):
  # DeepViT passes depth as a list whose length is the depth.
  return {"depth": len(v) if isinstance(v, (list, tuple)) else int(v)}


def _keep_rate(v):
  rates = list(v) if isinstance(v, (list, tuple)) else [v]
  return {"keep_rate": [float(r) for r in rates], "keep_rate_blocks": None}


def _block_layers(family):
  def check(v):
    attr = v.get("$module_attr") if isinstance(v, dict) else v
    allowed = {"deit3": ("Layer_scale_init_Block",), "cait": ("LayerScale_Block",)}.get(family, ())
    if attr not in allowed:
      raise ValueError(f"block_layers={v!r} is not supported for the {family} family (only {allowed})")
    return {}
  return check


# The arguments every ViT family's official class shares (timm's VisionTransformer lineage).
_VIT: dict[str, Callable[[Any], dict]] = {
    "img_size": _same("img_size"), "patch_size": _same("patch_size"), "in_chans": _same("in_chans"),
    "num_classes": _same("num_classes"), "embed_dim": _same("embed_dim"), "depth": _depth,
    "num_heads": _same("num_heads"), "mlp_ratio": _same("mlp_ratio"), "qkv_bias": _same("qkv_bias"),
    "qk_scale": _same("qk_scale"), "drop_rate": _same("drop_rate"), "attn_drop_rate": _same("attn_drop_rate"),
    "drop_path_rate": _same("drop_path_rate"), "norm_layer": _norm_layer,
}

_FAMILY: dict[str, dict[str, Callable[[Any], dict]]] = {
    "deit": {**_VIT, "representation_size": _only(None, "representation_size"),
             "hybrid_backbone": _only(None, "hybrid_backbone")},
    "ao": {**_VIT, "representation_size": _only(None, "representation_size"),
           "hybrid_backbone": _only(None, "hybrid_backbone")},
    "deit3": {**_VIT, "block_layers": _block_layers("deit3"), "init_scale": _same("layer_scale"),
              "drop_block_rate": _only(None, "drop_block_rate"), "dpr_constant": _ignored,
              "global_pool": _only(None, "global_pool")},
    "cait": {**_VIT, "block_layers": _block_layers("cait"), "init_scale": _same("layer_scale"),
             "depth_token_only": _same("class_attn_depth"), "mlp_ratio_clstk": _only(4.0, "mlp_ratio_clstk"),
             "representation_size": _only(None, "representation_size"),
             "hybrid_backbone": _only(None, "hybrid_backbone")},
    "augvit": {**_VIT, "mode": lambda v: {"aug_shortcut": None if v == "base" else v}, "num_cir": _same("num_cir"),
               "representation_size": _only(None, "representation_size"),
               "hybrid_backbone": _only(None, "hybrid_backbone")},
    "deepvit": {**_VIT, "apply_transform": lambda v: {"reattention": [bool(x) for x in v]},
                "transform_scale": _same("reattention_scale"),
                "use_cnn_embed": lambda v: {"stem": "cnn" if v else "patch"},
                "scale_adjustment": _same("scale_adjustment"),
                # accepted by the official class and unused by it
                "group": _ignored, "share": _ignored, "bs": _ignored, "spp": _ignored,
                "re_atten": _only(True, "re_atten"), "cos_reg": _ignored,
                "representation_size": _only(None, "representation_size"),
                "hybrid_backbone": _only(None, "hybrid_backbone")},
    "evit": {**_VIT, "keep_rate": _keep_rate, "fuse_token": _same("fuse_token"),
             "base_keep_rate": lambda v: {"keep_rate": float(v)}, "drop_loc": lambda v: {
                 "keep_rate_blocks": tuple(v)},
             "representation_size": _only(None, "representation_size"),
             "distilled": _only(False, "distilled")},
    # OliverRensu/Shunted-Transformer SSA.py `ShuntedTransformer`: per-stage lists under the same names;
    # `num_stages` keeps the first entries of each list (see _first_stages); img_size and patch_size are
    # accepted and unused, by the official class and ours.
    "shunted": {**{k: _same(k) for k in (
        "img_size", "patch_size", "in_chans", "num_classes", "embed_dims", "num_heads", "mlp_ratios", "depths",
        "sr_ratios", "num_conv", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate",
        "num_stages")}, "norm_layer": _norm_layer},
}


# Defaults of the official class where our registered name differs (the name follows the training scripts or
# the official constructors, which pass their own values). Shunted lists every per-stage argument, so that
# `num_stages` can cut them.
_OFFICIAL_DEFAULTS = {
    "evit": {"fuse_token": False},
    "shunted": dict(embed_dims=[64, 128, 256, 512], num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4],
                    depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1], num_stages=4, qkv_bias=False, num_conv=0,
                    norm_eps=1e-5),
}


def _evit_keep_rates(out: dict) -> dict:
  if isinstance(out.get("keep_rate"), list):
    # A per-block list is complete on its own (1 = no reorganisation).
    out["keep_rate_blocks"] = None
    if len(out["keep_rate"]) == 1:
      out["keep_rate"] = out["keep_rate"][0]
  return out


_PER_STAGE = ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios")


def _first_stages(out: dict) -> dict:
  # The official class loops over range(num_stages) and indexes the per-stage lists: longer lists are cut.
  n = int(out.pop("num_stages"))
  for k in _PER_STAGE:
    if len(out[k]) < n:
      raise ValueError(f"official argument {k}={out[k]!r} has fewer than num_stages={n} entries")
    out[k] = list(out[k][:n])
  return out


_FINALIZE: dict[str, Callable[[dict], dict]] = {"evit": _evit_keep_rates, "shunted": _first_stages}


def official_overrides(name: str, **kwargs) -> dict:
  """Translate official constructor arguments into `create_model` overrides for `name` (module docstring)."""
  spec = get_spec(name)
  family = spec.family
  table = _FAMILY.get(family, _VIT)
  unknown = [k for k in kwargs if k not in table]
  if unknown:
    raise TypeError(f"official constructor of {name!r} ({spec.source}): unknown argument(s) {unknown}; "
                    f"known: {sorted(table)}")
  out = dict(_OFFICIAL_DEFAULTS.get(family, {}))
  for key, value in kwargs.items():
    out.update(table[key](value))
  return _FINALIZE.get(family, dict)(out)


def from_official_constructor(name: str, *, rngs=None, seed: int = 0, overrides: dict | None = None,
                              **kwargs):
  """Build the model `name(**kwargs)` would build in the official repository (see module docstring).
  `overrides` adds our own execution options that change no weights (e.g. scan_blocks, dtype)."""
  return create_model(name, rngs=rngs, seed=seed, **{**official_overrides(name, **kwargs), **(overrides or {})})
