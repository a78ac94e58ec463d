"""Model registry: official names -> configurations, and `create_model(name, **overrides)`.

Every registered name builds the official architecture with the official defaults (parameter counts are
tested against the official listing `tests/data/state_dicts/<name>.tsv`). Overrides use our own clean names (the keyword
arguments of the model class: img_size, patch_size, embed_dim, depth, num_heads, num_classes, and one name
per fix: layer_scale, talking_heads, attn_scale, feat_scale, reattention, aug_shortcut, keep_rate, ...).
An unknown override is an error that names the nearest valid one.

Each entry also carries the preprocessing defaults of its family (mean/std, crop_pct, interpolation) so
that the input pipeline and the PyTorch exporter read them from one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable

from flax import nnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  family: str                       # key-map family for interop: deit, deit3, cait, augvit, deepvit, ao, evit, shunted
  builder: Callable[..., nnx.Module]
  kwargs: dict
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  crop_pct: float = 0.875
  interpolation: str = "bicubic"
  paper_top1: float | None = None   # ImageNet-1k top-1 reported by the authors (see README for sources)
  source: str = ""                  # official repository :: constructor

  def preprocessing(self) -> dict:
    return dict(mean=self.mean, std=self.std, crop_pct=self.crop_pct, interpolation=self.interpolation)


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, family: str, builder: Callable, kwargs: dict, **spec_fields) -> None:
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is registered twice")
  _REGISTRY[name] = ModelSpec(name, family, builder, dict(kwargs), **spec_fields)


def _ensure_loaded():
  # Importing the family modules registers their names.
  from vit_jax_fix.models import zoo  # noqa: F401


def list_models() -> list[str]:
  _ensure_loaded()
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  _ensure_loaded()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " See vit_jax_fix.list_models()."
    raise KeyError(f"unknown model name {name!r}.{hint}")
  return _REGISTRY[name]


def model_defaults(name: str) -> dict:
  """Preprocessing defaults of a registered model: mean, std, crop_pct, interpolation."""
  return get_spec(name).preprocessing()


def valid_overrides(builder: Callable) -> list[str]:
  target = builder.__init__ if isinstance(builder, type) else builder
  params = inspect.signature(target).parameters
  return [p for p in params if p not in ("self", "rngs")]


def check_overrides(builder: Callable, overrides: dict, what: str) -> None:
  valid = valid_overrides(builder)
  for key in overrides:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
      hint = f" Did you mean {close[0]!r}?" if close else f" Valid names: {', '.join(sorted(valid))}."
      raise TypeError(f"{what}: unknown argument {key!r}.{hint}")


def resolve_kwargs(name: str, **overrides) -> dict:
  spec = get_spec(name)
  check_overrides(spec.builder, overrides, f"create_model({name!r})")
  return {**spec.kwargs, **overrides}


def create_model(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **overrides) -> nnx.Module:
  """Build a registered model. Without `rngs`, parameters come from a fixed `seed` (also under
  `nnx.eval_shape`, which allocates nothing). Example:

      model = create_model('deit_small_patch16_224', num_classes=10, img_size=32, patch_size=4)
      model = create_model('deit_small_patch16_LS', aug_shortcut='circulant2', feat_scale='double')
  """
  spec = get_spec(name)
  kwargs = resolve_kwargs(name, **overrides)
  if rngs is None:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  model = spec.builder(rngs=rngs, **kwargs)
  model.spec_name = name
  return model


def count_params(model_or_state: Any) -> int:
  """Number of trainable parameters (nnx.Param), buffers excluded, like the official logs."""
  import jax
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return sum(int(x.size) for x in jax.tree.leaves(state))
