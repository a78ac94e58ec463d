"""Which timm model (name and constructor arguments) is each of our models, for the families timm has.

| our family | example registered name   | timm entry point            | timm constructor arguments                    |
|------------|---------------------------|-----------------------------|-----------------------------------------------|
| deit       | deit_small_patch16_224    | `deit_small_patch16_224`    | VisionTransformer (img_size, patch_size, ...) |
| deit3      | deit_small_patch16_LS     | `deit3_small_patch16_224`   | + no_embed_class=True, init_values=<gamma>    |
| cait       | cait_S24_224              | `cait_s24_224`              | Cait + init_values, depth_token_only          |
| deit (dist_token) | deit_small_distilled_patch16_224 | same name           | VisionTransformerDistilled (same keys)        |

Key names: timm's ViT keys are the official DeiT keys; DeiT III's `blocks.i.gamma_{1,2}` become
`blocks.i.ls{1,2}.gamma` (`state_dict.py`, layout='timm'); timm's Cait keeps the official CaiT names.

A model is representable in timm only when it uses no option timm lacks (the rows of
`vit_jax_fix.models.options` marked LACKS: AttnScale, FeatScale, re-attention, augmented shortcuts, EViT token
reorganisation, the CNN stem, scale adjustment, LayerNorm eps other than 1e-6; and here: talking heads outside
CaiT, a non-default qk_scale, per-block LayerScale values...). Otherwise `timm_config` raises
`TimmUnsupported` naming the options; export those models with layout='official'.
The other families (augvit, deepvit, ao, evit, shunted) come from official repositories that are not on
PyPI; their parity is tested against golden outputs of the official code instead (tests/data/golden).
"""
from __future__ import annotations

import inspect
import math

from vit_jax_fix import errors
from vit_jax_fix.models import options
from vit_jax_fix.models.registry import get_spec, resolve_kwargs

TIMM_FAMILIES = ("deit", "deit3", "cait")


class TimmUnsupported(errors.UsageError, ValueError):
  """The model uses options that no timm model has; export it with layout='official'."""


def full_kwargs(name: str, **overrides) -> dict:
  """Every constructor argument of `create_model(name, **overrides)`: class defaults, then the registered
  configuration, then the overrides."""
  builder = get_spec(name).builder
  target = builder.__init__ if isinstance(builder, type) else builder
  defaults = {k: p.default for k, p in inspect.signature(target).parameters.items()
              if p.default is not inspect.Parameter.empty and k not in ("self", "rngs")}
  return {**defaults, **resolve_kwargs(name, **overrides)}


def _timm_name(name: str, family: str, distilled: bool = False) -> str:
  if family == "deit" and distilled:   # timm's VisionTransformerDistilled
    return name if "_distilled_" in name else "deit_small_distilled_patch16_224"
  if family == "deit":
    return name if name.startswith("deit_") and "_distilled_" not in name else "deit_small_patch16_224"
  if family == "deit3":
    # deit_small_patch16_LS (official) and deit3_small_patch16_224 (our alias) -> timm's deit3_*
    for size in ("tiny", "small", "medium", "base", "large", "huge"):
      if f"_{size}_" in name:
        return f"deit3_{size}_patch16_224"
    return "deit3_small_patch16_224"
  if family == "cait":
    return name.lower() if name.lower() in ("cait_xxs24_224", "cait_s24_224") else "cait_s24_224"
  raise TimmUnsupported(f"family {family!r} has no timm model; use layout='official'")


def _all_default(opt: options.Option, kw: dict) -> bool:
  """Whether option `opt` has its default in every block of the model built from `kw`."""
  try:
    values = opt.values(kw[opt.name], int(kw["depth"]), kw)
  except ValueError:  # an invalid value (create_model says why): judge the value as given
    values = [kw[opt.name]]
  return all(opt.is_default(v) for v in values)


def _uniform(value, what, problems):
  """One value for every block (timm has no per-block choice)."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) > 1:
      problems.append(f"{what}={list(value)} (per-block values)")
      return value[0]
    return value[0] if value else None
  return value


def timm_config(name: str, **overrides) -> tuple[str, dict]:
  """(timm model name, timm.create_model keyword arguments) building the timm twin of
  `create_model(name, **overrides)`; raises TimmUnsupported with every option timm lacks."""
  spec = get_spec(name)
  if spec.family not in TIMM_FAMILIES:
    raise TimmUnsupported(f"{name!r} is a {spec.family!r} model; timm has no such model "
                          f"(timm families: {TIMM_FAMILIES}). Export it with layout='official'.")
  kw = full_kwargs(name, **overrides)
  problems = []
  for opt in options.timm_lacks():   # each must keep its default in every block
    if opt.name in kw and not _all_default(opt, kw):
      problems.append(f"{opt.name}={kw[opt.name]!r}")
  head_dim = kw["embed_dim"] // kw["num_heads"]
  if kw.get("qk_scale") is not None and not math.isclose(kw["qk_scale"], head_dim ** -0.5):
    problems.append(f"qk_scale={kw['qk_scale']!r}")
  talking = _uniform(kw.get("talking_heads", False), "talking_heads", problems)
  layer_scale = _uniform(kw.get("layer_scale"), "layer_scale", problems)
  class_attn_depth = int(kw.get("class_attn_depth", 0) or 0)
  if spec.family == "cait":
    if not talking or not class_attn_depth or layer_scale is None:
      problems.append("CaiT without talking heads / class attention / LayerScale")
    if kw.get("dynamic_img_size"):
      problems.append("dynamic_img_size=True (timm's Cait has no such option)")
  else:
    if talking:
      problems.append(f"talking_heads={kw['talking_heads']!r} (timm has them only in Cait)")
    if class_attn_depth:
      problems.append(f"class_attn_depth={class_attn_depth} (timm has class attention only in Cait)")
  if problems:
    raise TimmUnsupported(f"{name!r} with {overrides or 'its defaults'} cannot be a timm model: "
                          f"{'; '.join(problems)}. Export it with layout='official'.")

  img = kw["img_size"]
  out = dict(img_size=tuple(img) if isinstance(img, (list, tuple)) else int(img),
             patch_size=int(kw["patch_size"]), in_chans=int(kw.get("in_chans", 3)),
             num_classes=int(kw["num_classes"]), embed_dim=int(kw["embed_dim"]), depth=int(kw["depth"]),
             num_heads=int(kw["num_heads"]), mlp_ratio=float(kw["mlp_ratio"]), qkv_bias=bool(kw["qkv_bias"]))
  if spec.family == "cait":
    out.update(init_values=float(layer_scale), depth_token_only=class_attn_depth,
               mlp_ratio_token_only=float(kw["mlp_ratio"]))
  else:
    out.update(no_embed_class=kw.get("pos_embed", "cls") == "patches",
               init_values=None if layer_scale is None else float(layer_scale))
    if kw.get("dynamic_img_size"):
      out["dynamic_img_size"] = True
  return _timm_name(name, spec.family, bool(kw.get("dist_token"))), out


def is_timm_model(name: str, **overrides) -> bool:
  try:
    timm_config(name, **overrides)
    return True
  except TimmUnsupported:
    return False


def default_layout(name: str, **overrides) -> str:
  """'timm' for models timm has (ViT/DeiT/DeiT III/CaiT without extra fixes), else 'official'."""
  return "timm" if is_timm_model(name, **overrides) else "official"


def create_timm_model(name: str, *, pretrained_file: str | None = None, **overrides):
  """The timm twin of `create_model(name, **overrides)`, random init (never downloads) or loaded from a file
  exported by `vit_jax_fix.convert to-torch` (timm's own loader, through `pretrained_cfg_overlay`)."""
  from vit_jax_fix.interop.torch_compat import import_timm
  timm = import_timm()
  timm_name, kwargs = timm_config(name, **overrides)
  if pretrained_file is None:
    return timm.create_model(timm_name, pretrained=False, **kwargs)
  overlay = dict(file=str(pretrained_file), num_classes=kwargs["num_classes"])
  return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
