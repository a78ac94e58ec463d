"""Flax NNX <-> PyTorch state_dict conversion, by walking the module tree.

Module attributes are named after the official PyTorch modules, so a parameter's torch key is its NNX path
joined by dots, with the layout change given by the type of the module that owns it:

| NNX module      | NNX leaf                 | torch key                    | layout                       |
|-----------------|--------------------------|------------------------------|------------------------------|
| nnx.Linear      | kernel (in, out), bias   | weight (out, in), bias       | transpose                    |
| nnx.Conv        | kernel (kh, kw, in, out) | weight (out, in, kh, kw)     | transpose (3, 2, 0, 1)       |
| nnx.LayerNorm   | scale, bias              | weight, bias                 |                              |
| nnx.BatchNorm   | scale, bias, mean, var   | weight, bias, running_mean, running_var (+ num_batches_tracked) |
| anything else   | a Param `name`           | `name`                       | as is                        |

Two small hooks keep family quirks next to the module that has them, instead of in name tables:
- `torch_child_names` (dict on a module): the torch name of a child attribute, e.g. AugViT's two-path
  projections live in `nn.Sequential(..., GELU)` so `augs_attn` is `augs_attn.0`; '' inlines the child
  (FeatScale's `lamb1` sits on the block in the official code).
- `torch_buffers()` (method on a module): constant buffers the official code keeps in its state_dict
  (AugViT's `index_matrix`): re-emitted on export, checked on import.

`layout='timm'` applies timm's renames on top (DeiT III LayerScale: gamma_1 -> ls1.gamma).
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix import errors
from vit_jax_fix.models import layout as param_layout

LAYOUTS = ("official", "timm")

# timm's names for the official keys (applied to our official keys when layout='timm').
_LS_TIMM = [(r"^blocks\.(\d+)\.gamma_(\d)$", r"blocks.\1.ls\2.gamma")]
_TIMM_RENAMES = {
    "deit3": _LS_TIMM,
    "deit": _LS_TIMM,  # a DeiT with layer_scale=... is timm's VisionTransformer(init_values=...)
}

_LEAF_NAMES = {
    nnx.Linear: {"kernel": "weight", "bias": "bias"},
    nnx.Conv: {"kernel": "weight", "bias": "bias"},
    nnx.LayerNorm: {"scale": "weight", "bias": "bias"},
    nnx.BatchNorm: {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"},
}


class StateDictMismatch(errors.UserError, ValueError):
  """Raised when a state_dict does not fit a model; the message lists every offending key."""


def _to_torch_layout(owner: nnx.Module, leaf: str, value):
  if isinstance(owner, nnx.Linear) and leaf == "kernel":
    return np.asarray(value).T
  if isinstance(owner, nnx.Conv) and leaf == "kernel":
    return np.asarray(value).transpose(3, 2, 0, 1)
  return np.asarray(value)


def _from_torch_layout(owner: nnx.Module, leaf: str, array: np.ndarray) -> np.ndarray:
  if isinstance(owner, nnx.Linear) and leaf == "kernel":
    return array.T
  if isinstance(owner, nnx.Conv) and leaf == "kernel":
    return array.transpose(2, 3, 1, 0)
  return array


def _torch_shape(owner, leaf, shape):
  if isinstance(owner, nnx.Linear) and leaf == "kernel":
    return tuple(shape[::-1])
  if isinstance(owner, nnx.Conv) and leaf == "kernel":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _leaf_name(owner, leaf):
  for cls, names in _LEAF_NAMES.items():
    if isinstance(owner, cls):
      return names.get(leaf, leaf)
  return leaf


class _Entry:
  """One torch key: either a model variable (with its owner module) or a constant buffer."""

  def __init__(self, key, owner=None, leaf=None, variable=None, buffer=None, kind="param"):
    self.key, self.owner, self.leaf, self.variable, self.buffer, self.kind = key, owner, leaf, variable, buffer, kind

  @property
  def shape(self):
    if self.variable is not None:
      return _torch_shape(self.owner, self.leaf, self.variable.shape)
    return tuple(np.shape(self.buffer))


def _entries(model: nnx.Module) -> Iterator[_Entry]:
  """All torch keys of `model` in module-tree order."""
  nodes = dict(nnx.iter_graph(model))

  def torch_prefix(path):
    parts = []
    for i, p in enumerate(path):
      parent = nodes[path[:i]]
      name = getattr(parent, "torch_child_names", {}).get(p, str(p))
      if name:
        parts.append(name)
    return parts

  for path, node in nodes.items():
    if isinstance(node, nnx.Variable) and isinstance(node, (nnx.Param, nnx.BatchStat)):
      owner = nodes[path[:-1]]
      key = ".".join(torch_prefix(path[:-1]) + [_leaf_name(owner, path[-1])])
      yield _Entry(key, owner, path[-1], node)
    elif isinstance(node, nnx.Module):
      prefix = torch_prefix(path)
      if isinstance(node, nnx.BatchNorm):
        yield _Entry(".".join(prefix + ["num_batches_tracked"]), buffer=np.array(1, np.int64),
                     kind="counter")
      if hasattr(node, "torch_buffers"):
        for name, buf in node.torch_buffers().items():
          yield _Entry(".".join(prefix + [name]), buffer=buf, kind="buffer")


def _rename(key: str, family: str | None, layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "timm":
    for pattern, repl in _TIMM_RENAMES.get(family or "", []):
      key = re.sub(pattern, repl, key)
  return key


def _family(model) -> str | None:
  name = getattr(model, "spec_name", None)
  if name is None:
    return None
  from vit_jax_fix.models.registry import get_spec
  return get_spec(name).family


def torch_keys(model: nnx.Module, layout: str = "official") -> dict[str, tuple]:
  """{torch key: torch shape} of a model (works on an abstract `nnx.eval_shape` model too)."""
  model = param_layout.with_param_layout(model, param_layout.PER_BLOCK)
  fam = _family(model)
  return {_rename(e.key, fam, layout): e.shape for e in _entries(model)}


def to_torch_state_dict(model: nnx.Module, layout: str = "official") -> dict[str, np.ndarray]:
  """The model's weights as a flat {torch key: numpy array} in PyTorch layouts, buffers included."""
  model = param_layout.with_param_layout(model, param_layout.PER_BLOCK)
  fam = _family(model)
  out = {}
  for e in _entries(model):
    value = _to_torch_layout(e.owner, e.leaf, e.variable[...]) if e.variable is not None else e.buffer
    out[_rename(e.key, fam, layout)] = np.asarray(value)
  return out


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch here
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def from_torch_state_dict(model: nnx.Module, state_dict: dict[str, Any], layout: str = "official",
                          *, strict: bool = True) -> nnx.Module:
  """Load a flat {torch key: array} (numpy or torch tensors, PyTorch layouts) into `model` in place and
  return it. Missing keys, unexpected keys, shape mismatches and wrong constant buffers raise one
  `StateDictMismatch` that lists all of them (strict=False allows missing/unexpected keys only).
  A model with stacked blocks (param_layout='stacked') is loaded through its per-block view."""
  target = model
  model = param_layout.with_param_layout(model, param_layout.PER_BLOCK)
  fam = _family(model)
  entries = {_rename(e.key, fam, layout): e for e in _entries(model)}
  given = {k: _as_numpy(v) for k, v in state_dict.items()}
  missing = [k for k in entries if k not in given and entries[k].kind != "counter"]
  unexpected = [k for k in given if k not in entries]
  bad_shape, bad_buffer = [], []
  for key, e in entries.items():
    if key not in given:
      continue
    arr = given[key]
    if e.kind == "counter":
      continue
    if tuple(arr.shape) != e.shape:
      bad_shape.append(f"{key}: checkpoint {tuple(arr.shape)} vs model {e.shape}")
    elif e.kind == "buffer" and not np.array_equal(arr, e.buffer):
      bad_buffer.append(f"{key}: differs from the recomputed official constant")
  problems = []
  if bad_shape:
    problems.append("shape mismatches:\n  " + "\n  ".join(bad_shape))
  if bad_buffer:
    problems.append("constant buffers:\n  " + "\n  ".join(bad_buffer))
  if strict and missing:
    problems.append(f"missing keys ({len(missing)}):\n  " + "\n  ".join(missing))
  if strict and unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}):\n  " + "\n  ".join(unexpected))
  if problems:
    name = getattr(model, "spec_name", type(model).__name__)
    raise StateDictMismatch(
        f"state_dict does not fit model {name!r} (layout={layout!r}):\n" + "\n".join(problems) +
        "\nCheck the model name and its arguments (depth, embed_dim, img_size, fixes) against the checkpoint.")
  for key, e in entries.items():
    if e.variable is None or key not in given:
      continue
    arr = _from_torch_layout(e.owner, e.leaf, given[key])
    e.variable.set_value(jnp.asarray(arr, dtype=e.variable.dtype))
  if target is not model:
    stacked = param_layout.with_param_layout(model, param_layout.STACKED)
    nnx.update(target, nnx.state(stacked, nnx.Not(nnx.RngState)))
  return target
