"""Initialisation from another checkpoint or from PyTorch / Google weights (``config.init_from``).

Sources: ``init_from.pretrained=True`` (the authors' released weights of ``config.model.name``, from the
registry's weights table through ``vit_jax_fix.interop.weights.resolve``: downloaded once into the cache,
read with the table's key layout), a trainer workdir / checkpoint dir (ours, or one written by
``train.checkpoint.save_model``), a
PyTorch ``.pth/.pt/.bin/.safetensors`` file (read by ``vit_jax_fix.interop.checkpoint_io.read_state_dict``:
``weights_only`` loading, ``{'model'|'state_dict'|'state_dict_ema'}`` wrappers, ``module.`` prefixes) or a
Google ViT ``.npz`` (``vit_jax_fix.interop.npz.load_npz``).

Shapes that match are copied; the position embedding is resized with
``vit_jax_fix.interop.position.resize_pos_embed`` (PyTorch's bicubic, prefix tokens kept) when the image or
patch grid differs; the head is re-initialised when the class count differs (``reinit_head='auto'``) or
always (``True``). Everything else that does not fit -- missing or extra leaves, other shapes, another
model -- is one :class:`InitFromMismatch` listing every mismatched key with both shapes.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_fix import errors
from vit_jax_fix.interop.position import resize_pos_embed as _torch_exact_resize
from vit_jax_fix.models import registry
from vit_jax_fix.train import sharding as shard_lib

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
HEADS = ("head", "head_dist")


class InitFromMismatch(errors.UserError, ValueError):
  """The init_from source does not fit the configured model; the message lists each key and shape."""


def resize_pos_embed(pe: np.ndarray, target_shape, num_prefix: int) -> np.ndarray:
  """(1, prefix + Hs*Ws, D) -> (1, prefix + Ht*Wt, D) on square grids, PyTorch bicubic (interop.position)."""
  pe = np.asarray(pe)
  n_tgt = int(target_shape[1]) - num_prefix
  gt = int(math.isqrt(n_tgt))
  if gt * gt != n_tgt:
    raise ValueError(f"pos_embed grids must be square to resize: {pe.shape} -> {tuple(target_shape)}")
  return _torch_exact_resize(pe, (gt, gt), num_prefix=num_prefix, method="bicubic").astype(pe.dtype)


def _pure(model):
  """(params, batch_stats) of a model as numpy nested dicts, blocks per block."""
  from vit_jax_fix.models import layout
  from vit_jax_fix.train.checkpoint import model_trees
  trees = model_trees(layout.with_param_layout(model, layout.PER_BLOCK))
  return trees["params"], trees["batch_stats"]


def _from_torch(path: str, name: str, kwargs: dict, layout: str, ema: bool):
  """Builds the model at the file's own class count and grid, loads it, returns (params, stats)."""
  from vit_jax_fix.interop import from_torch_state_dict
  from vit_jax_fix.interop.checkpoint_io import detect_layout, read_state_dict
  sd, info = read_state_dict(path, ema=True if ema else None)
  if layout == "auto":
    layout = detect_layout(sd, info["metadata"])
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
  try:
    from_torch_state_dict(model, sd, layout=layout)
  except ValueError as e:
    raise InitFromMismatch(f"init_from {path!r}: {e}") from None
  return _pure(model)


def _from_npz(path: str, name: str, kwargs: dict):
  """A Google ViT npz loaded at the model's grid (load_npz resizes it) and the npz's own class count."""
  from vit_jax_fix.interop.npz import load_npz
  kw = {k: v for k, v in kwargs.items() if k != "num_classes"}
  try:
    model, _ = load_npz(path, name, kw)
  except (ValueError, KeyError) as e:
    raise InitFromMismatch(f"init_from {path!r}: {e}") from None
  return _pure(model)


def _leaves(tree) -> dict:
  return {shard_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


FIX_HINT = ("Check config.model.name and config.model.overrides (depth, embed_dim, patch_size, ...) against "
            "the source, or set init_from.reinit_head=True for another head.")


def adapt(src: dict, target: dict, *, num_prefix: int, reinit_head, what: str = "params",
          source: str = "the source weights", hint: str = FIX_HINT) -> dict:
  """Fits source leaves onto the target tree (target: the freshly initialised values). Raises
  InitFromMismatch listing every leaf that is missing, unexpected or of a shape that cannot be adapted."""
  found = _leaves(src)
  problems = []

  def fit(path, tgt):
    name = shard_lib.path_str(path)
    is_head = name.split("/")[0] in HEADS
    if name not in found:
      if is_head and reinit_head is True:
        return tgt
      problems.append(f"{what}/{name}: missing from {source} (model {tuple(tgt.shape)})")
      return tgt
    node = found[name]
    if is_head and (reinit_head is True or (reinit_head == "auto" and np.shape(node) != tgt.shape)):
      return tgt
    if np.shape(node) == tgt.shape:
      return jnp.asarray(node, tgt.dtype)
    if name.split("/")[-1] == "pos_embed" and np.ndim(node) == 3 and np.shape(node)[-1] == tgt.shape[-1]:
      try:
        return jnp.asarray(resize_pos_embed(node, tgt.shape, num_prefix), tgt.dtype)
      except ValueError:
        pass
    problems.append(f"{what}/{name}: source {tuple(np.shape(node))} vs model {tuple(tgt.shape)}")
    return tgt

  out = jax.tree.map_with_path(fit, target)
  expected = _leaves(target)
  problems += [f"{what}/{k}: in {source} {tuple(np.shape(v))}, not in the model" for k, v in found.items()
               if k not in expected]
  if problems:
    shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
    raise InitFromMismatch(
        f"{source} does not fit the model ({len(problems)} mismatched key(s); only the head and pos_embed are "
        f"adapted):\n  {shown}\n{hint}")
  return out


def load_pretrained(config, model_def, params, batch_stats):
  """New (params, batch_stats) from config.init_from, fitted onto the given (freshly initialised) trees."""
  src_path, layout = config.init_from.path, config.init_from.layout
  source = f"init_from.path={src_path!r}"
  if config.init_from.get("pretrained", False):
    if src_path:
      raise errors.ConfigError(f"set init_from.path or init_from.pretrained, not both (path={src_path!r}).")
    from vit_jax_fix.interop.weights import released
    src_path, layout = released(model_def.name)   # the table's file: cached, else mirror, else download
    source = f"init_from.pretrained ({src_path})"
  src_p, src_s = read_weights(src_path, model_def, layout=layout, ema=bool(config.init_from.ema))
  return fit_weights(model_def, params, batch_stats, src_p, src_s, reinit_head=config.init_from.reinit_head,
                     source=f"init_from: {source}")


def read_weights(path: str, model_def, *, layout: str, ema: bool):
  """(params, batch_stats) as host nested dicts, blocks per block, from a PyTorch file (`layout` 'official',
  'timm' or 'auto': detected), a Google npz, or a trainer workdir / checkpoint dir; `ema` takes the EMA
  weights. Used by init_from and by `python -m vit_jax_fix.evaluate`."""
  if path.endswith(".npz") and os.path.isfile(path):
    return _from_npz(path, model_def.name, model_def.kwargs)
  if path.endswith(TORCH_SUFFIXES) and os.path.isfile(path):
    return _from_torch(path, model_def.name, model_def.kwargs, layout, ema)
  from vit_jax_fix.train.checkpoint import load_state_dicts
  return load_state_dicts(path, ema=ema)[2:]


def fit_weights(model_def, params, batch_stats, src_p, src_s, *, reinit_head, source: str, hint: str = FIX_HINT):
  """`read_weights`' trees fitted onto `params` / `batch_stats` (the model's own, either layout: freshly
  initialised values, or arrays of the right shapes) with `adapt`; returned in the model_def's layout."""
  resolved = registry.resolve_kwargs(model_def.name, **model_def.kwargs)
  prefix = _num_prefix(resolved, params)
  # Sources come per block; fit them in that layout (mismatch messages name blocks/i/...), then restack.
  params = adapt(src_p, model_def.per_block(params), num_prefix=prefix, reinit_head=reinit_head, source=source,
                 hint=hint)
  batch_stats = adapt(src_s, model_def.per_block(batch_stats), num_prefix=prefix, reinit_head=reinit_head,
                      what="batch_stats", source=source, hint=hint)
  return model_def.train_layout(params), model_def.train_layout(batch_stats)


def _num_prefix(resolved: dict, params) -> int:
  """Leading non-patch slots of pos_embed: from the model's own grid when it is known."""
  pe = params.get("pos_embed") if isinstance(params, dict) else None
  img, patch = resolved.get("img_size"), resolved.get("patch_size")
  if pe is not None and img and patch:
    h, w = (img, img) if not isinstance(img, (list, tuple)) else img
    return int(np.shape(pe)[1]) - (int(h) // int(patch)) * (int(w) // int(patch))
  return 1 if resolved.get("pos_embed", "cls") == "cls" else 0

