"""Model registry: official names -> configurations, and `create_model(name, **overrides)`.

Every registered name builds the official architecture with the official defaults (parameter counts are
tested against the official listing `tests/data/state_dicts/<name>.tsv`). Overrides use our own clean names (the keyword
arguments of the model class: img_size, patch_size, embed_dim, depth, num_heads, num_classes, and one name
per fix: layer_scale, talking_heads, attn_scale, feat_scale, reattention, aug_shortcut, keep_rate, ...).
An unknown override is an error that names the nearest valid one.

Each entry also carries the preprocessing defaults of its family (mean/std, crop_pct, interpolation) so
that the input pipeline and the PyTorch exporter read them from one place, and, where the authors released
weights, where to get them (`Weights`: URL from the authors' README, file name, key layout, sha256 or its
prefix; the table is at the end of `zoo.py`, the downloader is `vit_jax_fix.interop.weights`). Layers, one
way: `spec.py` (the table and its entry types) <- `zoo.py` (every family's names, filled in at import) <- this
module (look-up and construction). Models with the authors' weights come from `vit_jax_fix.create_model(name,
pretrained=True)` (`vit_jax_fix/api.py`), which sits above both this module and the weight loader in interop.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from flax import nnx

from vit_jax_fix import errors
# The table and its entry types live in `spec`; importing the zoo fills it with every family's names.
from vit_jax_fix.models import zoo  # noqa: F401
from vit_jax_fix.models.spec import (BROWSER_HOSTS, HALF, IMAGENET_MEAN, IMAGENET_STD, SPECS, ModelSpec,  # noqa: F401
                                     Weights, register, register_weights)

_REGISTRY = SPECS   # the same dict, under its former name


def pretrained_models() -> list[str]:
  """Registered names whose authors released weights (downloadable, or by hand for browser links)."""
  return sorted(n for n, s in SPECS.items() if s.weights is not None)


def list_models() -> list[str]:
  return sorted(SPECS)


def get_spec(name: str) -> ModelSpec:
  if name not in SPECS:
    close = difflib.get_close_matches(name, SPECS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " See vit_jax_fix.list_models()."
    raise errors.ConfigKeyError(f"unknown model name {name!r}.{hint}")
  return SPECS[name]


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


def create_model(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **overrides) -> nnx.Module:
  """Build a registered model. Without `rngs`, parameters come from a fixed `seed` (also under
  `nnx.eval_shape`, which allocates nothing). Example:

      model = create_model('deit_small_patch16_224', num_classes=10, img_size=32, patch_size=4)
      model = create_model('deit_small_patch16_LS', aug_shortcut='circulant2', feat_scale='double')

  An option value or combination the model cannot take (the constructors raise ValueError) is a
  `ConfigError` naming the model and its overrides. For released weights use `vit_jax_fix.create_model(name,
  pretrained=True)`.
  """
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
