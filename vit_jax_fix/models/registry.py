"""Model registry: official names -> configurations, and `create_model(name, **overrides)`.

Every registered name builds the official architecture with the official defaults (parameter counts are
tested against the official listing `tests/data/state_dicts/<name>.tsv`). Overrides use our own clean names (the keyword
arguments of the model class: img_size, patch_size, embed_dim, depth, num_heads, num_classes, and one name
per fix: layer_scale, talking_heads, attn_scale, feat_scale, reattention, aug_shortcut, keep_rate, ...).
An unknown override is an error that names the nearest valid one.

Each entry also carries the preprocessing defaults of its family (mean/std, crop_pct, interpolation) so
that the input pipeline and the PyTorch exporter read them from one place, and, where the authors released
weights, where to get them (`Weights`: URL from the authors' README, file name, key layout, sha256 or its
prefix; the table is at the end of `zoo.py`, the downloader is `vit_jax_fix.interop.weights`):

    model = create_model('deit_small_patch16_224', pretrained=True)      # the authors' weights, by name
    model = create_model('deit_small_patch16_224', pretrained='/path/or/https/url.pth')
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable

from flax import nnx

from vit_jax_fix import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# Hosts whose links open a web page (sign-in, virus-scan or captcha interstitials), not the file itself.
BROWSER_HOSTS = ("drive.google.com", "docs.google.com", "pan.baidu.com")


@dataclasses.dataclass(frozen=True)
class Weights:
  """Released weights of one registered name (one row of the weights table in `zoo.py`)."""
  url: str                          # as the authors publish it (README, or code: see `source`)
  file_name: str                    # name in the cache and in a mirror (for browser links: save it so)
  layout: str = "official"          # torch key layout, as `interop.checkpoint_io.load_torch(layout=...)`
  sha256: str = ""                  # full hex digest, or the prefix a torch.hub file name carries ('-a1311bcf')
  source: str = ""                  # where the URL is published
  note: str = ""                    # what a user must know (keep rate, pickled args, dead link, ...)

  @property
  def needs_browser(self) -> bool:
    """Google Drive / Baidu links cannot be fetched by a script: the file is downloaded by hand."""
    from urllib.parse import urlparse
    return urlparse(self.url).hostname in BROWSER_HOSTS


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
  weights: Weights | None = None    # the authors' released weights, if any (table at the end of zoo.py)

  def preprocessing(self) -> dict:
    return dict(mean=self.mean, std=self.std, crop_pct=self.crop_pct, interpolation=self.interpolation)


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, family: str, builder: Callable, kwargs: dict, **spec_fields) -> None:
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is registered twice")
  _REGISTRY[name] = ModelSpec(name, family, builder, dict(kwargs), **spec_fields)


def register_weights(name: str, weights: Weights) -> None:
  """Attach the released weights of a registered name (the weights table at the end of `zoo.py`)."""
  if name not in _REGISTRY:
    raise KeyError(f"weights for {name!r}: no such registered model")
  if weights.layout not in ("official", "timm"):
    raise ValueError(f"weights for {name!r}: layout must be 'official' or 'timm', got {weights.layout!r}")
  _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], weights=weights)


def pretrained_models() -> list[str]:
  """Registered names whose authors released weights (downloadable, or by hand for browser links)."""
  _ensure_loaded()
  return sorted(n for n, s in _REGISTRY.items() if s.weights is not None)


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
    raise errors.ConfigKeyError(f"unknown model name {name!r}.{hint}")
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
      raise errors.ConfigKeyError(f"{what}: unknown argument {key!r}.{hint}")


def _dtype(value, name: str):
  """`dtype` may be given by name ('bfloat16', 'float32', ...; what a config file or command line holds)."""
  if value is None or not isinstance(value, str):
    return value
  import jax.numpy as jnp
  try:
    return jnp.dtype(value).type
  except TypeError:
    raise errors.ConfigError(f"create_model({name!r}): dtype={value!r} is not a dtype name; use 'bfloat16', "
                             f"'float16' or 'float32'.") from None


def resolve_kwargs(name: str, **overrides) -> dict:
  spec = get_spec(name)
  check_overrides(spec.builder, overrides, f"create_model({name!r})")
  kwargs = {**spec.kwargs, **overrides}
  if "dtype" in kwargs:
    kwargs["dtype"] = _dtype(kwargs["dtype"], name)
  return kwargs


def create_model(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, pretrained: bool | str = False,
                 **overrides) -> nnx.Module:
  """Build a registered model. Without `rngs`, parameters come from a fixed `seed` (also under
  `nnx.eval_shape`, which allocates nothing). Example:

      model = create_model('deit_small_patch16_224', num_classes=10, img_size=32, patch_size=4)
      model = create_model('deit_small_patch16_LS', aug_shortcut='circulant2', feat_scale='double')

  `pretrained=True` loads the authors' weights of `name` (downloaded once into the cache; see
  `vit_jax_fix.interop.weights`), `pretrained='PATH'` or `'https://...'` that PyTorch file. The weights
  define the classifier: a `num_classes` other than the file's is an error (the trainer's `init_from`
  re-initialises a head of another size); other overrides (drop rates, keep_rate, dtype) apply.

  An option value or combination the model cannot take (the constructors raise ValueError) is a
  `ConfigError` naming the model and its overrides.
  """
  if pretrained is not False and pretrained is not None:
    if rngs is not None:
      raise ValueError("create_model: rngs= with pretrained=: the weights replace every parameter")
    # Imported here: interop builds its models through this module.
    from vit_jax_fix.interop.weights import load_pretrained
    return load_pretrained(name, pretrained, **overrides)
  spec = get_spec(name)
  kwargs = resolve_kwargs(name, **overrides)
  if rngs is None:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  try:
    model = spec.builder(rngs=rngs, **kwargs)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(f"{name} with {overrides or 'its defaults'}: {e}") from e
  model.spec_name = name
  return model


def count_params(model_or_state: Any) -> int:
  """Number of trainable parameters (nnx.Param), buffers excluded, like the official logs."""
  import jax
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return sum(int(x.size) for x in jax.tree.leaves(state))
