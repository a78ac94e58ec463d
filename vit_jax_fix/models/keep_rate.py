"""EViT keep-rate schedule with a bounded number of compiled programs.

Official schedule (`helpers.adjust_keep_rate`, evit.md section 7), called every iteration t:

    t <  start                  : kappa = 1 (no reorganisation)
    start <= t < start + ramp   : kappa = base + (1 - base) * (1 + cos(pi * (t - start) / ramp)) / 2
    t >= start + ramp           : kappa = base

with start = I * shrink_start_epoch and ramp = I * shrink_epochs (I iterations per epoch); from scratch
(run_code.sh) shrink_start 10, shrink_epochs 100; fine-tuning (finetune.sh) start 0, ramp 0 = constant base.
The runtime kappa acts only at the configured blocks (`drop_loc`, issue #7); evaluation uses the configured
base rate.

Every block stores its keep rate as a static attribute (the token counts are static shapes), so every
distinct kappa is a different XLA program. The official per-iteration cosine would compile one program per
step of the ramp (about 147 distinct token-count tuples at ImageNet scale for base 0.7). `keep_rate_at`
therefore quantises kappa to the grid

    {min(1, base + i * granularity) : i = 0, 1, ..., ceil((1 - base) / granularity)}

(rounded to nearest grid point, values rounded to 12 decimals so that equal rates are equal floats). The
number of distinct values, hence of compiled programs, is at most `max_programs(base, granularity)` =
ceil((1 - base) / granularity) + 1, e.g. 7 for base 0.7 at granularity 0.05, 4 at 0.1; 1 for a constant
schedule. `KeepRateSchedule` is that schedule with its settings bound (the trainer's
config.keep_rate_schedule), and `CompiledByKeepRate` keeps one compiled program per distinct value and counts
the compilations.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

from flax import nnx

from vit_jax_fix.models import layout, token_reorg

_DECIMALS = 12


def _check_rate(rate: float, what: str = "keep rate") -> float:
  rate = float(rate)
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"{what} must be in (0, 1], got {rate}")
  return rate


def keep_rate_grid(base_keep_rate: float, granularity: float) -> list[float]:
  """Every value `keep_rate_at` can return for this base and granularity, ascending (base first, 1 last)."""
  base = _check_rate(base_keep_rate, "base_keep_rate")
  if not granularity > 0:
    raise ValueError(f"granularity must be > 0, got {granularity}")
  if base == 1.0:
    return [1.0]
  n = math.ceil(round((1.0 - base) / granularity, 9))
  return sorted({round(min(1.0, base + i * granularity), _DECIMALS) for i in range(n + 1)})


def max_programs(base_keep_rate: float, granularity: float) -> int:
  """Upper bound on the number of distinct keep rates (= compiled programs) of a quantised schedule:
  ceil((1 - base) / granularity) + 1, the quotient taken with a 1e-9 tolerance (0.3 / 0.05 is 6, not
  6.000000000000001)."""
  return len(keep_rate_grid(base_keep_rate, granularity))


def cosine_keep_rate(step: int, *, base_keep_rate: float, start_step: int = 0, ramp_steps: int = 0) -> float:
  """The official, unquantised schedule (see the module docstring)."""
  base = _check_rate(base_keep_rate, "base_keep_rate")
  if step < start_step:
    return 1.0
  if ramp_steps <= 0 or step >= start_step + ramp_steps:
    return base
  t = (step - start_step) / ramp_steps
  return base + (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * t))


def keep_rate_at(step: int, *, base_keep_rate: float, start_step: int = 0, ramp_steps: int = 0,
                 granularity: float = 0.05) -> float:
  """Keep rate at a (global) training step: the official cosine schedule quantised to `keep_rate_grid`
  (nearest grid point). At most `max_programs(base_keep_rate, granularity)` distinct values over a run;
  exactly 1.0 before `start_step` and exactly `base_keep_rate` from `start_step + ramp_steps` on."""
  kappa = cosine_keep_rate(step, base_keep_rate=base_keep_rate, start_step=start_step, ramp_steps=ramp_steps)
  grid = keep_rate_grid(base_keep_rate, granularity)
  return min(grid, key=lambda g: (abs(g - kappa), -g))


@dataclasses.dataclass(frozen=True)
class KeepRateSchedule:
  """EViT's keep-rate warm-up with its settings bound: `schedule(step)` is `keep_rate_at(step, ...)`, the
  official cosine from 1 down to `base` quantised to the grid of `granularity`, so a run compiles at most
  `max_programs` programs (e.g. 7 for DeiT-S at 0.7 and granularity 0.05). Steps count optimizer updates."""
  base: float
  start_step: int = 0
  ramp_steps: int = 0
  granularity: float = 0.05

  def __post_init__(self):
    keep_rate_grid(self.base, self.granularity)      # validates both now, not at the first step

  @property
  def max_programs(self) -> int:
    return max_programs(self.base, self.granularity)

  def __call__(self, step: int) -> float:
    return keep_rate_at(step, base_keep_rate=self.base, start_step=self.start_step, ramp_steps=self.ramp_steps,
                        granularity=self.granularity)


# --- changing a built model's keep rate

def _blocks(model) -> Sequence[Any]:
  """Per block, the module whose `keep_rate` governs it (with param_layout='stacked', its segment's stack)."""
  blocks = layout.block_list(model)
  if blocks is None or not all(hasattr(b, "keep_rate") for b in blocks):
    raise TypeError(f"{type(model).__name__} has no EViT-capable blocks (a VisionTransformer is needed)")
  return blocks


def configured_keep_rates(model) -> tuple[float, ...]:
  """The per-block keep rates the model was built with (recorded by the first `set_keep_rate`)."""
  recorded = getattr(model, "configured_keep_rates", None)
  if recorded is not None:
    return tuple(recorded)
  return tuple(float(b.keep_rate) for b in _blocks(model))


def reorg_blocks(model) -> tuple[int, ...]:
  """Indices of the blocks configured to reorganise tokens (EViT's `drop_loc`)."""
  return tuple(i for i, k in enumerate(configured_keep_rates(model)) if k < 1.0)


def set_keep_rate(model, rate: float | None, *, blocks: Sequence[int] | None = None) -> None:
  """Set the runtime keep rate of the configured blocks in place (the official runtime `keep_rate`); other
  blocks keep 1. `rate=None` restores the configured rates (evaluation). `blocks` overrides which blocks
  reorganise (e.g. to schedule a model built with keep rate 1). Blocks store the rate as a static attribute,
  so every distinct rate is a different compiled program (see `keep_rate_at` for a bounded schedule)."""
  all_blocks = _blocks(model)
  configured = configured_keep_rates(model)
  if getattr(model, "configured_keep_rates", None) is None:
    model.configured_keep_rates = configured   # static attribute: remembered across later calls
  if rate is None:
    if blocks is not None:
      raise ValueError("rate=None restores the configured keep rates; do not pass blocks with it")
    for blk, k in zip(all_blocks, configured):
      blk.keep_rate = float(k)
    return
  rate = _check_rate(rate)
  depth = len(all_blocks)
  chosen = reorg_blocks(model) if blocks is None else tuple(sorted({int(i) % depth for i in blocks}))
  if blocks is not None and any(not -depth <= int(i) < depth for i in blocks):
    raise ValueError(f"block indices {list(blocks)} out of range for depth {depth}")
  if not chosen and rate < 1.0:
    raise ValueError("the model has no reorganising blocks (it was built with keep rate 1 everywhere); "
                     "pass blocks=(3, 6, 9) or build it with keep_rate=..., keep_rate_blocks=...")
  if rate < 1.0 and getattr(model, "num_prefix_tokens", 1) == 0:
    raise ValueError("EViT needs a class token in the self-attention blocks (not available in CaiT)")
  if rate < 1.0:
    shared = [i for i in chosen if sum(b is all_blocks[i] for b in all_blocks) > 1]
    if shared:
      raise ValueError(f"blocks {shared} are stored stacked with their neighbours (param_layout='stacked'), so "
                       f"they cannot reorganise tokens alone; build the model with keep_rate=..., "
                       f"keep_rate_blocks={list(chosen)} (a rate of 1 there is allowed) or param_layout='per_block'")
  for i, blk in enumerate(all_blocks):
    blk.keep_rate = rate if i in chosen else 1.0


def token_counts(num_tokens: int, rates: Sequence[float], fuse_token: bool) -> list[int]:
  """Sequence length after every block for per-block keep rates (1 = no reorganisation)."""
  out, n = [], num_tokens
  for r in rates:
    if r < 1.0:
      n = token_reorg.tokens_after(n, r, fuse_token)
    out.append(n)
  return out


class CompiledByKeepRate:
  """One compiled program per distinct keep rate, built on first use, and the count of compilations.

  `build(key)` returns the function to run at `key` and `jit` compiles it; `program(key)` does both on the
  first request and returns the same compiled function afterwards. `num_compiled` counts actual traces (one
  per compiled program), `programs` the keys compiled so far. The trainer keys by the scheduled rate (None:
  the configured rates) and builds the train step of `ModelDef.with_keep_rate(rate)`, jitted with the state's
  shardings.

  `CompiledByKeepRate.for_model(fn)` serves a function `fn(model, *args, **kwargs)` of an nnx model, which
  carries its keep rates itself: calling `step(rate, model, ...)` sets the model's runtime keep rate
  (`set_keep_rate`) and runs the `nnx.jit` program of the resulting per-block keep rates (so `rate=None`, the
  configured evaluation rates, shares the program of the base rate):

      step = CompiledByKeepRate.for_model(train_step)
      for t in range(num_steps):
        kappa = keep_rate_at(t, base_keep_rate=0.7, start_step=..., ramp_steps=..., granularity=0.05)
        loss = step(kappa, model, batch)
      assert step.num_compiled <= max_programs(0.7, 0.05)
  """

  def __init__(self, build: Callable[[Any], Callable], *, jit: Callable = nnx.jit,
               blocks: Sequence[int] | None = None):
    self.build, self.jit, self.blocks = build, jit, blocks
    self._cache: dict[Any, Callable] = {}
    self.num_compiled = 0

  @classmethod
  def for_model(cls, fn: Callable, *, blocks: Sequence[int] | None = None, **jit_kwargs) -> "CompiledByKeepRate":
    """`fn(model, ...)` compiled per per-block keep rates; `blocks` as in `set_keep_rate`."""
    return cls(lambda rates: fn, jit=functools.partial(nnx.jit, **jit_kwargs), blocks=blocks)

  @property
  def programs(self) -> list:
    return list(self._cache)

  def program(self, key) -> Callable:
    """The compiled function of `key`, built and jitted on first use."""
    fn = self._cache.get(key)
    if fn is None:
      inner = self.build(key)

      def traced(*args, **kwargs):
        self.num_compiled += 1   # runs only while tracing, i.e. once per compiled program
        return inner(*args, **kwargs)
      fn = self._cache[key] = self.jit(traced)
    return fn

  def __call__(self, rate: float | None, model, *args, **kwargs):
    """`fn(model, ...)` at keep rate `rate` (see `for_model`)."""
    rate = None if rate is None else round(_check_rate(rate), _DECIMALS)
    set_keep_rate(model, rate, blocks=None if rate is None else self.blocks)
    return self.program(tuple(float(b.keep_rate) for b in _blocks(model)))(model, *args, **kwargs)
