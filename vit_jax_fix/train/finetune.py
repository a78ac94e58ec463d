"""Initialisation from another checkpoint or from PyTorch weights (``config.init_from``).

Shapes that match are copied; the position embedding is resized (bicubic over the patch grid, prefix tokens
kept) when the image or patch grid differs; the head is re-initialised when the class count differs
(``reinit_head='auto'``) or always (``True``). Anything else that does not fit is an error naming the leaf.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models import registry
from vit_jax_fix.train import sharding as shard_lib

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def resize_pos_embed(pe: np.ndarray, target_shape, num_prefix: int) -> np.ndarray:
  """(1, prefix + Hs*Ws, D) -> (1, prefix + Ht*Wt, D), bicubic on the square grid (timm resample)."""
  pe = np.asarray(pe)
  n_src, n_tgt = pe.shape[1] - num_prefix, target_shape[1] - num_prefix
  gs, gt = int(math.isqrt(n_src)), int(math.isqrt(n_tgt))
  if gs * gs != n_src or gt * gt != n_tgt:
    raise ValueError(f"pos_embed grids must be square to resize: {pe.shape} -> {tuple(target_shape)}")
  grid = pe[0, num_prefix:].reshape(gs, gs, -1)
  out = jax.image.resize(jnp.asarray(grid, jnp.float32), (gt, gt, grid.shape[-1]), method="bicubic")
  return np.concatenate([pe[:, :num_prefix], np.asarray(out).reshape(1, gt * gt, -1)], axis=1).astype(pe.dtype)


def _torch_state_dict(path: str, ema: bool) -> dict:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if path.endswith(".npz"):
    return dict(np.load(path))
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=False)
  keys = (("model_ema", "state_dict_ema") if ema else ()) + ("model", "state_dict")
  for k in keys:
    if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
      return {n: v.float().numpy() if hasattr(v, "numpy") else np.asarray(v) for n, v in sd[k].items()}
  if ema:
    raise ValueError(f"{path}: no EMA weights ('model_ema' / 'state_dict_ema') in this file")
  return {n: v.float().numpy() if hasattr(v, "numpy") else np.asarray(v) for n, v in sd.items()}


def _from_torch(path: str, name: str, kwargs: dict, layout: str, ema: bool):
  """Builds the model at the checkpoint's own class count and grid, loads it, returns (params, stats)."""
  from vit_jax_fix.interop import from_torch_state_dict
  sd = _torch_state_dict(path, ema)
  kw = dict(kwargs)
  head = next((k for k in ("head.weight", "head.fc.weight") if k in sd), None)
  if head is not None:
    kw["num_classes"] = int(np.shape(sd[head])[0])
  if "pos_embed" in sd:
    resolved = registry.resolve_kwargs(name, **kw)
    prefix = 1 if resolved.get("pos_embed", "cls") == "cls" else 0
    n = int(np.shape(sd["pos_embed"])[1]) - prefix
    g = int(math.isqrt(n))
    if g * g == n:
      kw["img_size"] = g * int(resolved.get("patch_size", 16))
  model = registry.create_model(name, **kw)
  from_torch_state_dict(model, sd, layout=layout)
  _, p, _, s = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(p)), jax.tree.map(np.asarray, nnx.to_pure_dict(s))


def adapt(src: dict, target: dict, *, num_prefix: int, reinit_head, what: str = "params") -> dict:
  """Fits source leaves onto the target tree (target: the freshly initialised values)."""
  def fit(path, tgt):
    name = shard_lib.path_str(path)
    node = src
    try:
      for k in path:
        key = getattr(k, "key", k)
        node = node[key] if key in node else node[str(key)]
    except (KeyError, TypeError):
      raise ValueError(f"init_from: {what} leaf {name!r} is missing from the source weights") from None
    is_head = name.split("/")[0] in ("head", "head_dist")
    if is_head and (reinit_head is True or (reinit_head == "auto" and np.shape(node) != tgt.shape)):
      return tgt
    if np.shape(node) == tgt.shape:
      return jnp.asarray(node, tgt.dtype)
    if name.split("/")[-1] == "pos_embed":
      return jnp.asarray(resize_pos_embed(node, tgt.shape, num_prefix), tgt.dtype)
    raise ValueError(f"init_from: {what} leaf {name!r} has shape {np.shape(node)} in the source but "
                     f"{tgt.shape} in the model, and only the head and pos_embed can be adapted")
  return jax.tree.map_with_path(fit, target)


def load_pretrained(config, model_def, params, batch_stats):
  """New (params, batch_stats) from config.init_from, fitted onto the given (freshly initialised) trees."""
  src_path = config.init_from.path
  if src_path.endswith(TORCH_SUFFIXES) and os.path.isfile(src_path):
    src_p, src_s = _from_torch(src_path, model_def.name, model_def.kwargs, config.init_from.layout,
                               bool(config.init_from.ema))
  else:
    from vit_jax_fix.train.checkpoint import load_state_dicts
    _, _, src_p, src_s = load_state_dicts(src_path, ema=bool(config.init_from.ema))
  resolved = registry.resolve_kwargs(model_def.name, **model_def.kwargs)
  prefix = 1 if resolved.get("pos_embed", "cls") == "cls" else 0
  reinit = config.init_from.reinit_head
  params = adapt(src_p, params, num_prefix=prefix, reinit_head=reinit)
  batch_stats = adapt(src_s, batch_stats, num_prefix=prefix, reinit_head=reinit, what="batch_stats")
  return params, batch_stats
