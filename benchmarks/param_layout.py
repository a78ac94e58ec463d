"""What a stacked parameter layout for scanned blocks would buy: compile time and step time of one train step.

    python benchmarks/stacked_layout.py                                # DeiT-S width, 12 and 32 blocks, 224 px, batch 8
    python benchmarks/stacked_layout.py --depths 12 24 32 --out benchmarks/results/stacked_layout

The model stores one set of parameters per block (checkpoints and PyTorch conversion read them per block)
and stacks the blocks of a scan segment inside every step (`VisionTransformer._run_functional`); the
gradient comes back per block, and AdamW and the EMA update every leaf of every block. This script
compares that with a prototype in which the train state already holds the blocks' parameters stacked
(one leaf per parameter name with a leading depth axis), so nothing is stacked or sliced and the optimizer
sees 12 leaves instead of 12 x depth. Both run the same `Block` under the same `jax.lax.scan` and
`remat='dots'` policy; the train step is value_and_grad of the cross-entropy + AdamW + EMA, as in
`vit_jax_fix.train.steps`. Reported: lower + compile seconds and the median step time (interleaved rounds).
It is a measurement for issue #9 (the compile-time target), not a trainer feature.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vit_jax_fix.models.registry import create_model  # noqa: E402

NAME = "deit_small_patch16_224"
TX = optax.adamw(1e-3, weight_decay=0.05)


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _finish(loss_and_grad, params, opt, ema):
  """The trainer's update: gradient, AdamW, EMA."""
  loss, grads = loss_and_grad(params)
  updates, opt = TX.update(grads, opt, params)
  params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: 0.9998 * e + 0.0002 * p, ema, params)
  return params, opt, ema, loss


def per_block_step(depth: int):
  """The layout the library uses: one parameter set per block, stacked inside the step."""
  model = create_model(NAME, depth=depth, drop_path_rate=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, opt, ema, rest, images, labels):
    return _finish(jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest)(images), labels)),
                   params, opt, ema)

  return step, (params, TX.init(params), jax.tree.map(jnp.copy, params), rest)


def stacked_step(depth: int):
  """Prototype: the state holds the blocks' parameters stacked; the scan reads them as they are."""
  shell = create_model(NAME, depth=1, drop_path_rate=0.0)          # embedding, norm and head
  block_graphdef = nnx.graphdef(shell.blocks[0])
  blocks = create_model(NAME, depth=depth, drop_path_rate=0.0).blocks
  block_states = [nnx.split(b, nnx.Param, ...)[1:] for b in blocks]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s[0] for s in block_states])
  stacked_rest = jax.tree.map(lambda *xs: jnp.stack(xs), *[s[1] for s in block_states])
  shell_graphdef, shell_params, shell_rest = nnx.split(shell, nnx.Param, ...)
  params = {"shell": shell_params, "blocks": stacked}
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

  def forward(p, rest, images):
    shell = nnx.merge(shell_graphdef, p["shell"], rest["shell"])
    x, grid = shell.embed(images)

    def body(carry, block_state):
      return nnx.merge(block_graphdef, *block_state)(carry, grid=grid)[0], None

    x, _ = jax.lax.scan(jax.checkpoint(body, policy=dots), x, (p["blocks"], rest["blocks"]))
    return shell.head(shell.norm(x)[:, 0])

  def step(params, opt, ema, rest, images, labels):
    return _finish(jax.value_and_grad(lambda p: _loss(forward(p, rest, images), labels)), params, opt, ema)

  return step, (params, TX.init(params), jax.tree.map(jnp.copy, params), {"shell": shell_rest, "blocks": stacked_rest})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--depths", type=int, nargs="+", default=[12, 32])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--img", type=int, default=224)
  ap.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved)")
  ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, args.img, args.img, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  load0 = os.getloadavg()[0]
  rows, runners = [], {}
  for depth in args.depths:
    for layout, make in (("per-block (library)", per_block_step), ("stacked (prototype)", stacked_step)):
      step, state = make(depth)
      t = time.perf_counter()
      compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, images, labels).compile()
      compile_s = time.perf_counter() - t
      state = compiled(*state, images, labels)[:3] + (state[3],)       # warm-up step
      jax.block_until_ready(state)
      runners[(depth, layout)] = [compiled, state, []]
      rows.append(dict(depth=depth, layout=layout, compile_s=compile_s))
      print(f"depth {depth:2d} {layout:20s} compile {compile_s:6.2f} s", flush=True)
  for _ in range(args.rounds):
    for key, runner in runners.items():
      compiled, state, times = runner
      t = time.perf_counter()
      out = compiled(*state, images, labels)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
      runner[1] = out[:3] + (state[3],)
  for row in rows:
    row["step_s"] = statistics.median(runners[(row["depth"], row["layout"])][2])
  load1 = os.getloadavg()[0]
  lines = [f"Train step (grad + AdamW + EMA), DeiT-S width, {args.img} px, batch {args.batch}, fp32, "
           f"{jax.default_backend()}; load average {load0:.2f} at start, {load1:.2f} at end.", "",
           "| blocks | layout | lower + compile (s) | step (s, median of %d) |" % args.rounds, "|---:|---|---:|---:|"]
  lines += [f"| {r['depth']} | {r['layout']} | {r['compile_s']:.2f} | {r['step_s']:.3f} |" for r in rows]
  d0, d1 = min(args.depths), max(args.depths)
  for layout in ("per-block (library)", "stacked (prototype)"):
    c = {r["depth"]: r["compile_s"] for r in rows if r["layout"] == layout}
    lines.append(f"\n{layout}: compile time {d1} / {d0} blocks = {c[d1] / c[d0]:.2f}x")
  text = "\n".join(lines)
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".md").write_text(text + "\n")
    pathlib.Path(args.out + ".json").write_text(json.dumps(dict(rows=rows, load=[load0, load1],
                                                                batch=args.batch, img=args.img), indent=1))


if __name__ == "__main__":
  main()
