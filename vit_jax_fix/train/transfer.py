"""Transfer optimisation: layer-wise learning-rate decay and freezing by regex (``config.optimizer``).

**Layer-wise decay** (``optimizer.layer_decay`` = d, BEiT's recipe with timm 1.0's ``param_groups_layer_decay``
semantics). Every parameter gets a layer id, for a model of L blocks:

    0                 the stem: patch_embed, cls_token, dist_token, pos_embed (timm also: reg_token, norm_pre)
    i + 1             block i (0-based)
    j + L - J + 1     CaiT's class-attention block j of J: they overlap the last J self-attention blocks
    L                 the final norm: with the last block (timm's ``(r'^norm', (99999,))``, "same group as before")
    L + 1             everything else: head, head_dist, fc_norm

and its update is multiplied by ``d ** (L + 1 - id)``: the head trains at the base rate, the stem at d^(L+1) of
it. timm numbers the distinct ordinals of the model's ``group_matcher`` in order, which for the ViT family and
CaiT gives exactly these ids (tests/test_transfer.py compares every factor with timm's ``lr_scale``). Shunted,
which timm lacks, numbers its blocks across the stages; a stage's ``patch_embed{s}`` (the down-sampling that
starts stage s > 1) goes with the stage's first block and ``norm{s}`` with its last, as timm groups Swin's
down-sampling layers and norms (``patch_embed1`` is the stem, id 0). The factor scales the whole update,
weight decay included -- what a per-group learning rate does to torch's decoupled weight decay -- after
clipping, which sees the raw gradients as in timm's train loop.

**Freezing** (``optimizer.freeze``, a regex): a parameter is frozen when the regex matches its per-block path
(``re.fullmatch`` on 'blocks/3/attn/qkv/kernel', 'head/kernel', 'pos_embed', ...) whatever layout the trainer
stores it in. Frozen leaves are labelled for ``optax.multi_transform`` with ``optax.set_to_zero()``: no
update, no weight decay, no optimizer state, and no part in gradient clipping (PyTorch's requires_grad=False).
The train step keeps their EMA at the old value (``keep_frozen``: an EMA step of a constant is not
bit-exact in floating point). A stack of blocks only some of which are frozen stays in the trained group:
the frozen blocks' gradient rows are zeroed before the optimizer and their update rows after it.

Stacked blocks (``block_stacks/j/...``, a leading block axis, `vit_jax_fix.models.layout`): a leaf holds blocks
a .. a + n - 1, so its layer factor and its frozen flag are vectors along that axis.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_fix.errors import ConfigError
from vit_jax_fix.models import layout

STEM = ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre")
TRAIN, FROZEN = "train", "frozen"


def _names(path) -> list[str]:
  return [layout._key_name(k) for k in path]


def _leaves(params) -> list[tuple[list[str], Any]]:
  return [(_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


class _Structure:
  """Where the blocks of a params tree are: block counts per stack / stage, read from names and shapes."""

  def __init__(self, params):
    self.stack_start: dict[str, int] = {}
    stacks = params.get(layout.STACKED_KEY) if isinstance(params, dict) else None
    if stacks:
      start = 0
      for j in sorted(stacks, key=int):
        self.stack_start[str(j)] = start
        start += int(jax.tree.leaves(stacks[j])[0].shape[0])
      self.depth = start
    else:
      self.depth = len(params.get(layout.PER_BLOCK_KEY, {})) if isinstance(params, dict) else 0
    self.token_only = len(params.get("blocks_token_only") or {}) if isinstance(params, dict) else 0
    stages = sorted(int(m.group(1)) for k in params for m in [re.fullmatch(r"block(\d+)", str(k))] if m)
    self.stage_start: dict[int, int] = {}
    self.stage_depth: dict[int, int] = {}
    start = 0
    for s in stages:                  # Shunted: block1 .. block4, one entry per block of the stage
      self.stage_start[s], self.stage_depth[s] = start, len(params[f"block{s}"])
      start += self.stage_depth[s]
    if stages:
      self.depth = start

  def layer_id(self, names: list[str], rows: int | None = None):
    """An int, or for a stacked leaf of `rows` blocks an int vector (see the module docstring)."""
    top, L = names[0], self.depth
    if top == layout.STACKED_KEY:
      return self.stack_start[names[1]] + np.arange(rows) + 1
    if top == layout.PER_BLOCK_KEY:
      return int(names[1]) + 1
    if top == "blocks_token_only":
      return int(names[1]) + L - self.token_only + 1
    if top in STEM:
      return 0
    if top == "norm":
      return L
    m = re.fullmatch(r"(block|patch_embed|norm)(\d+)", top)
    if m and int(m.group(2)) in self.stage_start:
      s = int(m.group(2))
      if m.group(1) == "block":
        return self.stage_start[s] + int(names[1]) + 1
      if m.group(1) == "norm":
        return self.stage_start[s] + self.stage_depth[s]
      return 0 if s == min(self.stage_start) else self.stage_start[s] + 1
    return L + 1

  def per_block_names(self, names: list[str], rows: int | None = None) -> list[str]:
    """The per-block path(s) of a leaf: one per block row of a stacked leaf."""
    if names[0] == layout.STACKED_KEY:
      a = self.stack_start[names[1]]
      return ["/".join([layout.PER_BLOCK_KEY, str(a + t)] + names[2:]) for t in range(rows)]
    return ["/".join(names)]


def _rows(names, x) -> int | None:
  return int(x.shape[0]) if names[0] == layout.STACKED_KEY else None


def layer_ids(params) -> dict[str, Any]:
  """{'a/b/c': layer id} for every leaf of a params tree (either layout; an int vector for stacked leaves)."""
  st = _Structure(params)
  return {"/".join(n): st.layer_id(n, _rows(n, x)) for n, x in _leaves(params)}


def layer_scales(params, decay: float) -> dict[str, Any]:
  """{'a/b/c': decay ** (L + 1 - layer id)}: float, or a float32 vector for stacked leaves."""
  st = _Structure(params)
  out = {}
  for n, x in _leaves(params):
    lid = st.layer_id(n, _rows(n, x))
    scale = float(decay) ** (st.depth + 1 - np.asarray(lid, np.float64))
    out["/".join(n)] = scale.astype(np.float32) if np.ndim(lid) else float(scale)
  return out


def frozen_map(params, regex: str) -> dict[str, Any]:
  """{'a/b/c': True | False | bool vector (stacked leaf, per block)}: whether `regex` fullmatches the
  per-block path. A regex that does not compile, or matches nothing / everything, is a ConfigError."""
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise ConfigError(f"config.optimizer.freeze={regex!r} is not a regular expression: {e}") from None
  st = _Structure(params)
  out = {}
  for n, x in _leaves(params):
    hits = [bool(pattern.fullmatch(p)) for p in st.per_block_names(n, _rows(n, x))]
    out["/".join(n)] = np.array(hits) if n[0] == layout.STACKED_KEY and len(set(hits)) > 1 else hits[0]
  flat = [v for f in out.values() for v in np.ravel(f)]
  if not any(flat) or all(flat):
    raise ConfigError(f"config.optimizer.freeze={regex!r} matches {'no' if not any(flat) else 'every'} "
                      f"parameter. It is matched in full (re.fullmatch) against per-block paths such as "
                      f"{', '.join(sorted(out)[:3])}; e.g. '(?!head/).*' freezes all but the head.")
  return out


def _rows_shape(v, x):
  """A per-block vector `v` shaped to broadcast over the stacked leaf `x`."""
  return jnp.asarray(v).reshape((-1,) + (1,) * (x.ndim - 1))


def _per_leaf(values: dict, fn):
  """A stateless transform applying fn(update, value) to every leaf whose path has a value; optax's
  MaskedNode (a leaf another multi_transform group owns) passes through."""
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def update_fn(updates, state, params=None):
    def one(path, u):
      v = values.get(layout.path_str(path))
      return u if masked(u) or v is None else fn(u, v)
    return jax.tree.map_with_path(one, updates, is_leaf=masked), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _zero_rows(frozen: dict):
  """Zero the frozen blocks' rows of partly frozen stacked leaves."""
  rows = {k: ~v for k, v in frozen.items() if np.ndim(v)}
  return _per_leaf(rows, lambda u, keep: u * _rows_shape(keep, u).astype(u.dtype))


def _scale(scales: dict):
  return _per_leaf({k: v for k, v in scales.items() if np.any(np.asarray(v) != 1.0)},
                   lambda u, s: u * jnp.asarray(_rows_shape(s, u) if np.ndim(s) else s, u.dtype))


def wrap(tx: optax.GradientTransformation, params, *, layer_decay: float = 0.0,
         freeze: str = "") -> optax.GradientTransformation:
  """`tx` with layer-wise decay and freezing (either off: 0 / ''), see the module docstring. `params` may be
  abstract: only names and shapes are read."""
  if not (layer_decay and layer_decay != 1.0) and not freeze:
    return tx
  frozen = frozen_map(params, freeze) if freeze else {}
  parts = [_zero_rows(frozen)] if any(np.ndim(v) for v in frozen.values()) else []
  parts.append(tx)
  if layer_decay and layer_decay != 1.0:
    parts.append(_scale(layer_scales(params, layer_decay)))
  inner = optax.chain(*parts) if len(parts) > 1 else tx
  if not any(v is True for v in frozen.values()):
    return inner
  labels = lambda p: jax.tree.map_with_path(
      lambda path, _: FROZEN if frozen.get(layout.path_str(path)) is True else TRAIN, p)
  return optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)


def keep_frozen(frozen: dict | None, new, old):
  """`new` with the frozen leaves (rows) of `old`: the EMA of a frozen parameter stays bit-identical."""
  if not frozen:
    return new

  def one(path, n, o):
    f = frozen.get(layout.path_str(path), False)
    if np.ndim(f):
      return jnp.where(_rows_shape(f, n), o, n)
    return o if f else n
  return jax.tree.map_with_path(one, new, old)
