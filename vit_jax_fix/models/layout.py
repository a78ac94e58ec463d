"""The parameter layout of the ViT backbone's blocks: where their variables live. One home for the concept.

Two layouts hold the same values and compute the same function:

* ``'per_block'`` -- one parameter set per block: ``model.blocks[i]``, state paths ``blocks/i/...``. The
  layout of PyTorch checkpoints, of interop and of every reader of trained weights.
* ``'stacked'`` -- one Block per *segment* whose every variable carries a leading axis of the segment's
  length: ``model.block_stacks[j]``, paths ``block_stacks/j/...``. The trainer's layout: nothing is stacked
  or sliced per step, and the optimizer sees one leaf per parameter name and segment, so the train-step
  program (and its compile time) stops growing with depth.

A segment is a run of consecutive blocks that `jax.lax.scan` can run as one traced body: blocks sharing one
graph (the same options; drop-path rates are variables) that keep every token (a block that reorganises
tokens, EViT, stands alone). With ``scan_blocks=False`` every block is a segment of its own, and only the
per-block layout exists. The stacked layout stores exactly the segments the per-block layout runs, so the
two layouts give the same function, gradients and updates (tests/test_param_layout.py).

Everything that depends on the layout goes through this module: converting a model (`with_param_layout`) or
a nested dict of its variables (`tree_in_layout`, `stack_block_tree`, `unstack_block_tree`), the segments a
forward pass runs (`segments_to_run`), recognising a leaf of stacked blocks by its path (`is_stacked_path`:
its leading axis is the block axis, which the optimizer maps over and sharding never splits) and whether a
model family has the option at all (`has_option`: the ViT backbone does, Shunted does not).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PER_BLOCK = "per_block"
STACKED = "stacked"
LAYOUTS = (PER_BLOCK, STACKED)
OPTION = "param_layout"          # the constructor argument that chooses the layout
PER_BLOCK_KEY = "blocks"         # model attribute / state path of the per-block layout
STACKED_KEY = "block_stacks"     # model attribute / state path of the stacked layout


def check(layout: str, scan_blocks: bool = True) -> str:
  """`layout` if the model can store its blocks so, else a ValueError saying what to use."""
  if layout not in LAYOUTS:
    raise ValueError(f"param_layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == STACKED and not scan_blocks:
    raise ValueError("param_layout='stacked' runs the blocks of a segment under jax.lax.scan: it needs "
                     "scan_blocks=True (or use param_layout='per_block')")
  return layout


# --- which models have the option

def has_option(builder: Callable) -> bool:
  """Whether a model constructor (class or function) takes `param_layout` (the ViT backbone; not Shunted)."""
  target = builder.__init__ if isinstance(builder, type) else builder
  return OPTION in inspect.signature(target).parameters


def resolve(builder: Callable, overrides: dict, requested: str | None = None) -> str | None:
  """The layout a trainer stores a model in: the `param_layout` override, else `requested`, else 'stacked'
  where the blocks are scanned; None for families without the option."""
  if not has_option(builder):
    return None
  return overrides.get(OPTION) or requested or (STACKED if overrides.get("scan_blocks", True) else PER_BLOCK)


# --- a model's blocks

def layout_of(model) -> str | None:
  """The layout a model stores its blocks in; None for models without the option."""
  if not hasattr(model, STACKED_KEY):
    return None
  return STACKED if getattr(model, STACKED_KEY) is not None else PER_BLOCK


def stack_size(stack) -> int:
  """Number of blocks in a stack: the leading axis of its variables."""
  leaves = jax.tree.leaves(nnx.state(stack, nnx.Param)) or jax.tree.leaves(nnx.state(stack))
  return int(leaves[0].shape[0])


def stack_sizes(model) -> tuple[int, ...]:
  """Blocks per stack of a model in the stacked layout; () otherwise."""
  if layout_of(model) != STACKED:
    return ()
  return tuple(stack_size(s) for s in getattr(model, STACKED_KEY))


def block_list(model) -> list | None:
  """Per block (length depth), the module holding it: the Block itself (per-block layout) or the stack of its
  segment (stacked layout, so one module appears once per block it holds); None for models without blocks
  in a layout."""
  layout = layout_of(model)
  if layout is None:
    return None
  if layout == PER_BLOCK:
    return list(getattr(model, PER_BLOCK_KEY))
  return [s for s in getattr(model, STACKED_KEY) for _ in range(stack_size(s))]


def segments(blocks: Sequence, scan_blocks: bool) -> list[list]:
  """Blocks grouped for execution (see the module docstring): with scan_blocks, runs of consecutive blocks
  that share one graph and keep every token (`keep_rate == 1`); otherwise one block each."""
  blocks = list(blocks)
  if not scan_blocks:
    return [[b] for b in blocks]
  out: list[list] = []
  prev = None
  for b in blocks:
    gd = nnx.graphdef(b)
    if out and b.keep_rate == 1.0 and prev == gd and out[-1][-1].keep_rate == 1.0:
      out[-1].append(b)
    else:
      out.append([b])
    prev = gd
  return out


def stack_blocks(blocks: Sequence) -> Any:
  """One Block whose every variable has a leading axis of len(blocks) (the blocks must share one graph)."""
  graphdef = nnx.graphdef(blocks[0])
  if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
    raise ValueError("only blocks with identical options can be stacked")
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks]))


def unstack_blocks(stack, n: int | None = None) -> list:
  """The blocks of a stack (inverse of `stack_blocks`)."""
  graphdef, state = nnx.split(stack)
  n = stack_size(stack) if n is None else n
  return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(n)]


def set_layout(model, layout: str) -> None:
  """Convert a model's block storage in place (the arrays are shared; see `with_param_layout`)."""
  current = layout_of(model)
  if current is None:
    raise TypeError(f"{type(model).__name__} has no parameter layout option")
  check(layout, getattr(model, "scan_blocks", True))
  if layout == current:
    return
  if layout == STACKED:
    segs = segments(getattr(model, PER_BLOCK_KEY), model.scan_blocks)
    setattr(model, STACKED_KEY, nnx.List([stack_blocks(seg) for seg in segs]))
    setattr(model, PER_BLOCK_KEY, nnx.data(None))
  else:
    setattr(model, PER_BLOCK_KEY, nnx.List([b for s in getattr(model, STACKED_KEY) for b in unstack_blocks(s)]))
    setattr(model, STACKED_KEY, nnx.data(None))


def with_param_layout(model, layout: str):
  """`model` with its blocks stored in `layout` ('per_block' or 'stacked'): a new model sharing the arrays,
  or `model` itself when it already is in that layout or has no such option (Shunted)."""
  if layout_of(model) in (None, layout):
    check(layout)
    return model
  if any(not isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree.leaves(nnx.state(model))):
    # An abstract (nnx.eval_shape) model: convert its shapes.
    return nnx.eval_shape(lambda m: with_param_layout(m, layout), model)
  new = nnx.clone(model)
  set_layout(new, layout)
  return new


class Segment:
  """Consecutive blocks as the forward pass runs them, whatever the layout: `n` blocks, their `functional()`
  form (graphdef and state, stacked along a leading axis when n > 1) and `write_back(new)` for the state the
  blocks changed (BatchNorm statistics, RNG counters), given in the form of that state. `block` is the
  Block itself when the segment is one block of the per-block layout (it can run as a module), else None."""

  def __init__(self, n: int, *, blocks: Sequence | None = None, stack=None, offset: int = 0):
    self.n, self._blocks, self._stack = n, blocks, stack
    self._offset = offset   # a part of a stack: its blocks offset .. offset + n - 1
    self.block = blocks[0] if blocks is not None and n == 1 else None

  def part(self, start: int, n: int) -> "Segment":
    """Blocks start .. start + n - 1 of this segment as a segment of their own: a forward pass that keeps
    chosen blocks' outputs, or stops after one, runs a scanned segment in parts (each part's last carry is
    the output of its last block; nothing per block is stacked)."""
    if not (0 <= start and n >= 1 and start + n <= self.n):
      raise ValueError(f"blocks {start}..{start + n - 1} are not in a segment of {self.n}")
    if start == 0 and n == self.n:
      return self
    if self._stack is not None:
      return Segment(n, stack=self._stack, offset=self._offset + start)
    return Segment(n, blocks=self._blocks[start:start + n])

  def _whole_stack(self) -> bool:
    return self._offset == 0 and self.n == stack_size(self._stack)

  def functional(self):
    if self._stack is not None:
      graphdef, state = nnx.split(self._stack)
      if self.n == 1:
        return graphdef, jax.tree.map(lambda a: a[self._offset], state)
      if not self._whole_stack():
        state = jax.tree.map(lambda a: a[self._offset:self._offset + self.n], state)
      return graphdef, state
    states = [nnx.state(b) for b in self._blocks]
    state = states[0] if self.n == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.graphdef(self._blocks[0]), state

  def write_back(self, new) -> None:
    if self._stack is not None:
      part = jax.tree.map(lambda a: a[None], new) if self.n == 1 else new
      if not self._whole_stack():
        # Scatter the part's rows into the stack's current values (only the variables that changed).
        current = dict(nnx.to_flat_state(nnx.state(self._stack)))
        o, n = self._offset, self.n
        part = nnx.from_flat_state([
            (p, current[p].replace(current[p].get_value().at[o:o + n].set(v.get_value())))
            for p, v in nnx.to_flat_state(part)])
      nnx.update(self._stack, part)
      return
    for i, b in enumerate(self._blocks):
      nnx.update(b, new if self.n == 1 else jax.tree.map(lambda a: a[i], new))


def segments_to_run(model) -> list[Segment]:
  """The segments of a model's blocks, in order (stacked layout: its stacks; per-block: `segments`)."""
  if layout_of(model) == STACKED:
    return [Segment(stack_size(s), stack=s) for s in getattr(model, STACKED_KEY)]
  return [Segment(len(seg), blocks=seg) for seg in segments(getattr(model, PER_BLOCK_KEY), model.scan_blocks)]


# --- nested dicts of a model's variables (nnx.to_pure_dict: the trainer's params / batch_stats trees)

def stack_block_tree(tree: dict, sizes: Sequence[int]) -> dict:
  """A nested dict of a per-block model's variables ('blocks' -> {i: ...}) in the stacked layout
  ('block_stacks' -> {j: ...} with leading axes `sizes`). Other keys pass through."""
  if PER_BLOCK_KEY not in tree:
    return dict(tree)
  blocks = tree[PER_BLOCK_KEY]
  if sum(sizes) != len(blocks):
    raise ValueError(f"stack sizes {tuple(sizes)} cover {sum(sizes)} blocks, the tree has {len(blocks)}")
  out = {k: v for k, v in tree.items() if k != PER_BLOCK_KEY}
  starts = np.cumsum((0,) + tuple(sizes))
  out[STACKED_KEY] = {j: jax.tree.map(_stack_leaves, *[blocks[i] for i in range(a, a + n)])
                      for j, (a, n) in enumerate(zip(starts, sizes))}
  return out


def _stack_leaves(*xs):
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
  return jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)


def _leaf_of_stack(a, t: int):
  return jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[t]


def unstack_block_tree(tree: dict, sizes: Sequence[int]) -> dict:
  """Inverse of `stack_block_tree`."""
  if STACKED_KEY not in tree:
    return dict(tree)
  out = {k: v for k, v in tree.items() if k != STACKED_KEY}
  out[PER_BLOCK_KEY] = {}
  for j, n in enumerate(sizes):
    for t in range(n):
      out[PER_BLOCK_KEY][len(out[PER_BLOCK_KEY])] = jax.tree.map(lambda a: _leaf_of_stack(a, t),
                                                                 tree[STACKED_KEY][j])
  return out


def tree_in_layout(tree, layout: str | None, sizes: Sequence[int] = ()):
  """A nested dict of variables (either layout) in `layout` (None: the per-block form; `sizes`: the stack
  sizes, needed for either conversion); returned unchanged when it already is."""
  if layout == STACKED and PER_BLOCK_KEY in tree:
    return stack_block_tree(tree, sizes)
  if layout != STACKED and STACKED_KEY in tree:
    return unstack_block_tree(tree, sizes)
  return tree


# --- leaves by path

def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def path_str(path) -> str:
  """A jax key path (`jax.tree.map_with_path`) as 'a/b/c': the one spelling of parameter paths that the
  optimizer masks, sharding rules, checkpoint shape tables and transfer options match against."""
  return "/".join(_key_name(k) for k in path)


def is_stacked_path(path) -> bool:
  """Whether the leaf at `path` belongs to stacked blocks, so that its leading axis is the block axis.
  `path`: a jax key path (`jax.tree.map_with_path`), a tuple of names (nnx), or names joined by '/'
  ('params/block_stacks/0/attn/qkv/kernel'; optimizer states nest the same names deeper)."""
  parts = path.split("/") if isinstance(path, str) else [_key_name(k) for k in path]
  return STACKED_KEY in parts[:-1]


def layout_of_paths(paths: Iterable) -> str:
  """The layout a table of leaf paths (e.g. a checkpoint's) stores its blocks in."""
  return STACKED if any(is_stacked_path(p) for p in paths) else PER_BLOCK


def map_blocks(f: Callable, path, *leaves):
  """f applied to each block of a stacked leaf separately (jax.vmap over the block axis), to other leaves as
  is: a per-parameter computation (LAMB's trust ratio) sees one block's parameter in either layout."""
  return jax.vmap(f)(*leaves) if is_stacked_path(path) else f(*leaves)
