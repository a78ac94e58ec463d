"""Which circulant form is faster on this backend: AugViT block with 'fft' vs 'dense' projections, DeiT block.

    python benchmarks/circulant_impl.py                      # batch 8, 197 tokens, D=384 (AugViT-S), 15 rounds
    python benchmarks/circulant_impl.py --out benchmarks/results/circulant_impl

One process, the variants compiled first, then timed INTERLEAVED (round r runs every variant once), so
that load from other jobs hits all of them alike. Per call: wall time and process CPU time (on a shared
machine the CPU time is the steadier measure of work); medians and minima are reported, with the load
average. Like main.py it runs under huge-page malloc on a CPU-only install (vit_jax_fix/hostmem.py). The
result decides `vit_jax_fix.models.shortcuts.AUTO_IMPL` for the backend: by CPU time on CPU, by wall time
on a GPU or TPU (where CPU time counts only the host's dispatch); there, run it at a training batch size
too (`--batch 128`), since the matrix units' advantage grows with the GEMM.

A fourth variant, `augvit_paths`, is the AugViT block with each projection replaced by an element-wise
scale (x * bias): what the official two-path form costs besides the projections (four erf-GELUs over D
channels, the sums, the 3/4 rescale). It is the floor that no circulant form can go below.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vit_jax_fix import hostmem  # noqa: E402

if __name__ == "__main__":
  hostmem.maybe_reexec_with_huge_pages(sys.argv)   # measure under the trainer's malloc

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vit_jax_fix.models import shortcuts, vit  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402


@contextlib.contextmanager
def projections_as_scales():
  """While tracing: every AugViT path projection p(x) becomes x * p.bias (same paths, no projection)."""
  apply_group = shortcuts.apply_group
  shortcuts.apply_group = lambda projs, x: [x * p.bias[...] for p in projs]
  try:
    yield
  finally:
    shortcuts.apply_group = apply_group


def build(variant: str, x):
  with projections_as_scales() if variant == "augvit_paths" else contextlib.nullcontext():
    return _build(variant, x)


def _build(variant: str, x):
  impl = {"augvit_fft": "fft", "augvit_dense": "dense", "augvit_paths": "fft"}.get(variant)
  kw = {} if variant == "deit" else dict(aug_shortcut="circulant2", circulant_impl=impl)
  blk = vit.Block(x.shape[-1], x.shape[-1] // 64, rngs=nnx.Rngs(0), **kw)
  graphdef, params, rest = nnx.split(blk, nnx.Param, ...)

  def f(p, x):
    return nnx.merge(graphdef, p, rest)(x)[0]

  fwd = jax.jit(f).lower(params, x).compile()
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1))).lower(params, x).compile()
  return {"fwd": lambda: fwd(params, x).block_until_ready(),
          "grad": lambda: jax.block_until_ready(grad(params, x))}, f(params, x)


KEY_LABEL = {"cpu_median": "CPU median", "wall_median": "wall median"}


def timing_key(backend: str) -> str:
  """On CPU the process CPU time is the steadier measure of work on a shared machine; on an accelerator it only
  counts the host's dispatch, so the wall time (each call ends in block_until_ready) decides there."""
  return "cpu_median" if backend == "cpu" else "wall_median"


def faster_forms(ms: dict, key: str) -> dict:
  """{'fwd': 'fft' | 'dense', 'grad': ...}: the form with the lower `key` time, per pass."""
  return {s: min(("fft", "dense"), key=lambda i: ms[f"augvit_{i}:{s}"][key]) for s in ("fwd", "grad")}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--tokens", type=int, default=197)
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--out", default=None, help="output prefix (.json and .md)")
  args = p.parse_args()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.tokens, args.dim)), jnp.float32)
  variants = ["deit", "augvit_fft", "augvit_dense", "augvit_paths"]
  fns, outs = {}, {}
  for v in variants:
    f, outs[v] = build(v, x)
    fns.update({f"{v}:{k}": g for k, g in f.items()})
  diff = float(jnp.max(jnp.abs(outs["augvit_fft"] - outs["augvit_dense"])))
  load0 = os.getloadavg()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(args.rounds):
    for k, f in fns.items():
      f()  # warm the caches for this variant
      t0, c0 = time.perf_counter(), time.process_time()
      f()
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  res = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), processor=machine.cpu_name(),
             batch=args.batch, tokens=args.tokens,
             dim=args.dim, rounds=args.rounds, glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
             loadavg_start=[round(v, 2) for v in load0],
             loadavg_end=[round(v, 2) for v in os.getloadavg()], fft_vs_dense_max_abs=diff,
             ms={k: dict(wall_median=1e3 * statistics.median(wall[k]), wall_min=1e3 * min(wall[k]),
                         cpu_median=1e3 * statistics.median(cpu[k]), cpu_min=1e3 * min(cpu[k])) for k in fns})
  key = timing_key(res["backend"])
  lines = [f"# Circulant projection forms on {res['backend']} ({res['device']}; {res['processor']})", "",
           f"`python benchmarks/circulant_impl.py` — block input ({args.batch}, {args.tokens}, {args.dim}), "
           f"{args.rounds} interleaved rounds, load average {res['loadavg_start']} -> {res['loadavg_end']}; "
           f"max |fft - dense| = {diff:.2e}; GLIBC_TUNABLES={res['glibc_tunables'] or '(unset)'}. "
           "`augvit_paths`: the projections replaced by element-wise scales (the floor of any circulant form).",
           "",
           f"| variant | wall median ms | wall min ms | CPU median ms | CPU min ms | {KEY_LABEL[key]} vs DeiT block |",
           "|---|---:|---:|---:|---:|---:|"]
  for k, m in res["ms"].items():
    base = res["ms"]["deit:" + k.split(":")[1]][key]
    lines.append(f"| {k} | {m['wall_median']:.1f} | {m['wall_min']:.1f} | {m['cpu_median']:.1f} | "
                 f"{m['cpu_min']:.1f} | {m[key] / base:.2f}x |")
  fast = faster_forms(res["ms"], key)
  lines += ["", f"Faster form on {res['backend']} (by {KEY_LABEL[key]}): forward {fast['fwd']}, gradient "
            f"{fast['grad']}."]
  md = "\n".join(lines) + "\n"
  print(md)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
  main()
