"""Where the time of one train step goes: the trainer's step under `jax.profiler`, summed per XLA kernel.

    python benchmarks/profile_step.py --model deepvit_patch16_224_re_attn_16b
    python benchmarks/profile_step.py --model deit_small_patch16_shrink_base:keep_rate=0.7 --out benchmarks/results/profile_evit07
    python benchmarks/profile_step.py --model shunted_t --forward     # the inference forward pass instead

--model takes the diagnostics CLI's spec, `name[:key=value,...]` (values are Python literals).

The step is `param_layout.build`'s (the trainer's: mixup, cross-entropy, grad, clipping, AdamW, EMA; batch 8,
224 px by default). Each executed XLA kernel (thunk) of the traced steps is attributed to the JAX operation
that produced it (its `op_name` metadata in the optimized HLO; control-flow thunks such as the scan's while
loop are left out, as their time is that of the kernels they run), then summed three ways: per kernel, per
pass (forward, backward = `transpose(jvp(...))`, everything else: optimizer, EMA, mixup), and per
primitive within each pass. Times are wall time of the kernels on the executing thread, per step.
`--forward` profiles the inference forward pass instead (eval mode, parameters in the trainer's layout).
Like main.py, it restarts itself with huge-page malloc on a CPU-only install (vit_jax_fix/hostmem.py;
VIT_JAX_FIX_HUGEPAGES=0 profiles glibc's default instead); the header line says which.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import time

from vit_jax_fix import hostmem

if __name__ == "__main__":
  hostmem.maybe_reexec_with_huge_pages(sys.argv)   # profile the trainer's conditions

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import param_layout  # noqa: E402  (the trainer's step, as main.py builds it)
from vit_jax_fix.diagnose import parse_model_spec  # noqa: E402
from vit_jax_fix.train import state as state_lib  # noqa: E402

CONTROL_FLOW = ("while", "conditional", "call")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name recorded for it in the optimized module."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def phase(op_name: str) -> str:
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp(" in op_name or op_name.startswith("jit(forward)"):
    return "forward"
  return "other (optimizer, EMA, mixup, loss)"


def primitive(op_name: str) -> str:
  """The last path component without its call-site suffix, e.g. 'dot_general', 'add', 'transpose'."""
  last = op_name.rstrip("/").split("/")[-1] if op_name else "(unnamed)"
  return re.sub(r"\[.*$", "", last) or "(unnamed)"


def kernel_times(trace_dir: str, module: str) -> dict[str, float]:
  """Summed nanoseconds per HLO op over every thunk of `module` in the trace."""
  paths = glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in jax.profiler.ProfileData.from_file(paths[0]).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        # Control flow (a scan's while loop, cond, call) spans the kernels it runs: counting it too would
        # count them twice.
        if stats.get("hlo_module") == module and op and op.split(".")[0] not in CONTROL_FLOW:
          totals[op] += event.duration_ns
  return totals


def forward_fn(name: str, img: int, overrides: dict):
  """jit(forward)(state, batch) -> (state, logits): the model of a train state in eval mode, shaped like the
  train step so that one loop profiles either."""
  model_def = state_lib.ModelDef.create(name, img_size=img, num_classes=1000, **overrides)

  def forward(state, batch):
    model = model_def.merge(state["params"], state["batch_stats"], train=False)
    return state, model(batch["image"])

  return jax.jit(forward)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=param_layout.NAME, help="name[:key=value,...] (model overrides)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--img", type=int, default=224)
  ap.add_argument("--steps", type=int, default=3, help="traced steps (after one warm-up step)")
  ap.add_argument("--top", type=int, default=20, help="rows of the per-kernel table")
  ap.add_argument("--forward", action="store_true", help="profile the inference forward pass, not a train step")
  ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
  args = ap.parse_args()
  name, overrides = parse_model_spec(args.model)
  step, state = param_layout.build(None, args.img, name=name, **overrides)
  batch = param_layout.random_batch(args.batch, args.img)
  if args.forward:
    module, what, run = "jit_forward", "Inference forward", forward_fn(name, args.img, overrides)
  else:
    module, what, run = "jit_train_step", "Train step", step
  compiled = run.lower(state, batch).compile()
  names = op_names(compiled.as_text())

  def one_step(carry):
    carry, out = compiled(carry, batch)
    jax.block_until_ready(out)
    return carry

  carry = one_step(state)                                              # warm-up
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      carry = one_step(carry)
  step_s = (time.perf_counter() - t) / args.steps
  per_kernel = {k: v / args.steps / 1e9 for k, v in kernel_times(trace_dir, module).items()}
  if not per_kernel:
    raise RuntimeError(f"the trace holds no kernel of {module} (profiler without XLA:CPU thunk events?)")
  kernel_s = sum(per_kernel.values())
  by_phase: dict[str, float] = collections.defaultdict(float)
  by_prim: dict[tuple[str, str], float] = collections.defaultdict(float)
  for kernel, seconds in per_kernel.items():
    op_name = names.get(kernel, "")
    by_phase[phase(op_name)] += seconds
    by_prim[(phase(op_name), primitive(op_name))] += seconds
  rows = sorted(per_kernel.items(), key=lambda kv: -kv[1])
  ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
  kind = "eval mode" if args.forward else "trainer's step: mixup, grad, clipping, AdamW, EMA"
  lines = [f"{what} of `{name}` {overrides or ''} ({kind}), batch {args.batch}, {args.img} px, "
           f"{jax.default_backend()}, jax {jax.__version__}: {ms(step_s)} ms per step (traced), kernels {ms(kernel_s)} ms; GLIBC_TUNABLES="
           f"{os.environ.get('GLIBC_TUNABLES') or '(unset)'}.", "",
           "| pass | ms / step | share of kernel time |", "|---|---:|---:|"]
  lines += [f"| {p} | {ms(s)} | {100 * s / kernel_s:.0f}% |" for p, s in sorted(by_phase.items(), key=lambda kv: -kv[1])]
  lines += ["", "| pass | primitive | ms / step |", "|---|---|---:|"]
  lines += [f"| {p} | {prim} | {ms(s)} |" for (p, prim), s in sorted(by_prim.items(), key=lambda kv: -kv[1])[:args.top]]
  lines += ["", f"Top {args.top} kernels:", "", "| kernel | ms / step | op_name |", "|---|---:|---|"]
  lines += [f"| {k} | {ms(s)} | `{names.get(k, '')[-110:]}` |" for k, s in rows[:args.top]]
  text = "\n".join(lines)
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".md").write_text(text + "\n")
    pathlib.Path(args.out + ".json").write_text(json.dumps(dict(
        model=name, overrides=overrides, forward=args.forward, glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
        batch=args.batch, img=args.img, step_s=step_s,
        kernel_s=kernel_s, by_phase=by_phase, kernels={k: [s, names.get(k, "")] for k, s in rows}), indent=1))


if __name__ == "__main__":
  main()
