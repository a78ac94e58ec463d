"""One-shot accelerator check (issue #24): throughput, MFU, attention kernels and circulant forms on one device.

    python benchmarks/device_check.py                    # one GPU or TPU, < 8 min; results/<device>/device_check.*
    python benchmarks/device_check.py --smoke --out DIR   # CPU, tiny models, one batch each (seconds; CI)

What it measures, on the first device of `jax.devices()`, each configuration in this one process:

1. **Throughput**: forward (eval) and train-step (AdamW + cross-entropy, donated state) images/s of DeiT-S,
   EViT-S keep 0.7, Shunted-T and CaiT-XXS24 in fp32 and bf16 compute (parameters fp32), at batch sizes that
   fill the device (a per-model base batch per 16 GiB of device memory, halved on out-of-memory), with the
   jit lower and compile times of each program.
2. **MFU** = FLOPs per image x images/s / the device's peak (`PEAKS`, by `device_kind`; bf16 peak for bf16
   compute, TF32 for fp32 on GPUs, where XLA's default precision takes TF32) and / the GEMM rate measured here
   (a 4096^3 matmul in the same dtype). FLOPs: XLA's cost analysis of the lowered forward and train step,
   blocks unrolled (`scan_blocks=False`) for the count only, since XLA counts a scan body once; the train
   step's count is its forward and backward without rematerialisation (model FLOPs).
3. **Attention kernels**: the bf16 train step and forward with the explicit map vs the fused
   `jax.nn.dot_product_attention` ('xla'; 'cudnn' on a CUDA GPU), via `attention.use_implementation`, for
   DeiT-S, EViT-S (fused output, class-token row alone) and Shunted-T (fused per head group); the kernel found
   in each lowered program (cuDNN's custom call `__cudnn$fmha...` or not) is recorded.
4. **Circulant forms**: AugViT-S train step and forward with FFT vs dense circulant projections, fp32 and bf16.

How to read the results into the code's defaults (per backend, `jax.default_backend()`): see
benchmarks/README.md ("Device check"): `vit_jax_fix.models.attention.AUTO_IMPL` and
`vit_jax_fix.models.shortcuts.AUTO_IMPL`. A time budget (`--budget-s`, default 400 s) skips what would not
finish; results (JSON + Markdown) are written after every configuration, so a cut run still reports.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import vit_jax_fix  # noqa: E402
from vit_jax_fix.models import attention  # noqa: E402
from train_step import functional_train_step  # noqa: E402  (benchmarks/, the script's folder)

# Dense peak FLOP/s per chip by device_kind (substring match, first hit), from the vendors' data sheets:
# bf16 tensor cores / MXU without sparsity; 'fp32' is what an fp32 matmul runs at under XLA's default precision
# (TF32 tensor cores on NVIDIA Ampere and later; on TPU fp32 matmuls are passes of bf16, no peak listed).
PEAKS = (
    ("H200", {"bf16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),            # SXM (HBM3)
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
    ("L4", {"bf16": 121e12, "fp32": 60e12}),
    ("A10G", {"bf16": 70e12, "fp32": 35e12}),
    ("TPU v6", {"bf16": 918e12, "fp32": None}),
    ("TPU v5 lite", {"bf16": 197e12, "fp32": None}),
    ("TPU v5p", {"bf16": 459e12, "fp32": None}),
    ("TPU v5", {"bf16": 459e12, "fp32": None}),
    ("TPU v4", {"bf16": 275e12, "fp32": None}),
)

# Base batch per 16 GiB of device memory (forward, train step); scaled by the memory, a power of two, <= 2048.
BASE_BATCH = {"deit": (256, 64), "evit_0.7": (256, 96), "shunted_t": (128, 32), "cait_xxs24": (256, 64),
              "augvit": (256, 48)}
MODELS = {
    "deit": ("deit_small_patch16_224", {}),
    "evit_0.7": ("deit_small_patch16_shrink_base", {"keep_rate": 0.7}),
    "shunted_t": ("shunted_t", {}),
    "cait_xxs24": ("cait_XXS24_224", {}),
    "augvit": ("augvit_small_circulant2", {}),
}
# Tiny stand-ins for --smoke (same code paths, seconds on a CPU).
_TINY_VIT = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10, scan_blocks=False)
SMOKE = {
    "deit": _TINY_VIT,
    "evit_0.7": dict(_TINY_VIT, keep_rate_blocks=(0,)),
    "shunted_t": dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                      mlp_ratios=(2, 2, 2, 2), num_classes=10),
    "cait_xxs24": _TINY_VIT,
    "augvit": _TINY_VIT,
}
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def plan(smoke: bool, backend: str) -> list[dict]:
  """The configurations in priority order (the budget cuts from the end). Each: section, model, dtype,
  impl (attention), circulant, what ('fwd+train')."""
  fused = ["explicit", "xla"] + (["cudnn"] if backend == "gpu" else [])
  if smoke:
    # Every section once; train steps only where the code differs (they dominate a CPU's compile time).
    fwd = ("fwd",)
    return [dict(section="throughput", model="deit", dtype="fp32"),
            dict(section="throughput", model="deit", dtype="bf16", what=fwd),
            dict(section="attention", model="evit_0.7", dtype="fp32", impl="explicit", what=fwd),
            dict(section="attention", model="evit_0.7", dtype="fp32", impl="xla", what=fwd),
            *[dict(section="circulant", model="augvit", dtype="fp32", circulant=c, what=fwd) for c in ("fft", "dense")]]
  # Accelerators: the bf16 comparisons first (what decides the defaults), each model's fused row doubling as
  # its throughput row; then fp32 and the rest. The budget cuts from the end.
  att = lambda m, d, impls: [dict(section="attention", model=m, dtype=d, impl=i) for i in impls]
  circ = lambda d: [dict(section="circulant", model="augvit", dtype=d, circulant=c) for c in ("fft", "dense")]
  out = att("deit", "bf16", fused[::-1]) + circ("bf16") + att("shunted_t", "bf16", fused[::-1])
  out += att("evit_0.7", "bf16", fused[::-1])
  out += att("deit", "fp32", ["xla"])
  out += [dict(section="throughput", model=m, dtype=d)
          for m, d in (("shunted_t", "fp32"), ("evit_0.7", "fp32"), ("cait_xxs24", "bf16"),
                       ("cait_xxs24", "fp32"))]
  out += circ("fp32") + att("deit", "fp32", ["explicit"])
  out += att("cait_xxs24", "bf16", fused[2:])
  return out


def device_slug(dev) -> str:
  kind = getattr(dev, "device_kind", "") or dev.platform
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or dev.platform


def peak_for(kind: str, dtype: str):
  for key, peaks in PEAKS:
    if key.lower() in kind.lower():
      return peaks[dtype]
  return None


def device_memory(dev) -> float | None:
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 -- CPU devices have no memory stats
    return None
  return stats.get("bytes_limit")


def batch_for(model_key: str, train: bool, mem: float | None, smoke: bool) -> int:
  if smoke:
    return 2
  base = BASE_BATCH[model_key][1 if train else 0]
  scale = max(1.0, (mem or 16 * 2 ** 30) / (16 * 2 ** 30))
  return int(min(2048, 2 ** int(np.log2(base * scale))))


def gemm_rate(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  t = timed(lambda: f(a, a).block_until_ready(), 2, 5, 2.0)["median_s"]
  return 2 * n ** 3 / t


def timed(fn, warmup: int, iters: int, max_s: float) -> dict:
  for _ in range(warmup):
    fn()
  ts, t_end = [], time.perf_counter() + max_s
  while len(ts) < iters and (len(ts) < 2 or time.perf_counter() < t_end):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(ts), "times_s": ts}


def build(cfg: dict, smoke: bool, abstract: bool = False, scan: bool = True):
  name, ov = MODELS[cfg["model"]]
  ov = dict(ov, **(SMOKE[cfg["model"]] if smoke else {}), dtype=DTYPES[cfg["dtype"]])
  if cfg.get("circulant"):
    ov["circulant_impl"] = cfg["circulant"]
  if not scan and not name.startswith("shunted"):
    ov["scan_blocks"] = False
  make = lambda: vit_jax_fix.create_model(name, **ov)
  return nnx.eval_shape(make) if abstract else make()


def image_shape(model, batch: int) -> tuple:
  size = getattr(model, "img_size", 224)
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  return (batch, h, w, 3)


train_step_fn = functional_train_step      # benchmarks/train_step.py, the step speed.py times


def flops_per_image(cfg: dict, smoke: bool, train: bool = True) -> dict:
  """XLA's cost analysis of the lowered forward and train step (blocks unrolled, nothing compiled or run)."""
  model = build(cfg, smoke, abstract=True, scan=False)
  b = 2
  x = jax.ShapeDtypeStruct(image_shape(model, b), jnp.float32)
  y = jax.ShapeDtypeStruct((b,), jnp.int32)
  model.eval()
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).cost_analysis()
  first = lambda c: c[0] if isinstance(c, (list, tuple)) else c
  out = {"fwd": float(first(fwd)["flops"]) / b}
  if train:
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt = jax.eval_shape(tx.init, params)
    tr = jax.jit(train_step_fn(graphdef, tx)).lower(params, rest, opt, x, y).cost_analysis()
    out["train"] = float(first(tr)["flops"]) / b
  return out


def is_oom(err: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def kernel_in(text: str) -> str:
  return "cudnn" if "cudnn$fmha" in text else "xla"


def measure(cfg: dict, args, mem, rng) -> dict:
  """Forward and train step of one configuration: batch, compile times, images/s, kernel in the program."""
  smoke = args.smoke
  warm, iters, max_s = (0, 1, 0.0) if smoke else (1, 10, 3.0)
  out = {}
  for what in cfg.get("what", ("fwd", "train")):
    batch = batch_for(cfg["model"], what == "train", mem, smoke)
    while True:
      try:
        out[what] = _measure_one(cfg, what, batch, smoke, rng, warm, iters, max_s)
        break
      except Exception as err:  # noqa: BLE001 -- out-of-memory halves the batch; anything else is recorded
        if is_oom(err) and batch > 1:
          batch //= 2
          continue
        out[what] = {"batch": batch, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        traceback.print_exc()
        break
  return out


def _measure_one(cfg, what, batch, smoke, rng, warm, iters, max_s) -> dict:
  model = build(cfg, smoke)
  shape = image_shape(model, batch)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ncls = int(getattr(model, "num_classes", 1000))
  y = jnp.asarray(rng.integers(0, ncls, size=(batch,)), jnp.int32)
  if what == "fwd":
    model.eval()
    graphdef, state = nnx.split(model)
    fn, call_args = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), (state, x)
  else:
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    fn = jax.jit(train_step_fn(graphdef, tx), donate_argnums=(0, 1, 2))
    call_args = (params, rest, tx.init(params), x, y)
  t0 = time.perf_counter()
  lowered = fn.lower(*call_args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  res = {"batch": batch, "lower_s": t1 - t0, "compile_s": t2 - t1, "kernel": kernel_in(compiled.as_text() or "")}
  if what == "fwd":
    run = lambda: compiled(*call_args).block_until_ready()
  else:
    carry = list(call_args[:3])

    def run():
      p, r, o, loss = compiled(*carry, x, y)
      loss.block_until_ready()
      carry[:] = [p, r, o]
  run()
  t = timed(run, warm, iters, max_s)
  res.update(t, img_s=batch / t["median_s"])
  return res


def run(args) -> dict:
  dev = jax.devices()[0]
  backend = jax.default_backend()
  kind = getattr(dev, "device_kind", dev.platform)
  slug = device_slug(dev)
  out_dir = pathlib.Path(args.out) if args.out else (None if args.smoke else ROOT / "benchmarks/results" / slug)
  mem = device_memory(dev)
  t_start = time.perf_counter()
  res = {"device_kind": kind, "backend": backend, "platform_version": getattr(dev.client, "platform_version", "?"),
         "jax": jax.__version__, "memory_bytes": mem, "smoke": args.smoke, "budget_s": args.budget_s,
         "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
         "attention_auto_impl": attention.AUTO_IMPL.get(backend), "peaks": {}, "gemm": {}, "configs": [],
         "skipped": []}
  n = 256 if args.smoke else 4096
  for d in ("fp32", "bf16"):
    res["peaks"][d] = peak_for(kind, d)
    res["gemm"][d] = gemm_rate(DTYPES[d], n)
  rng = np.random.default_rng(0)
  flops_cache: dict = {}
  for cfg in plan(args.smoke, backend):
    if cfg["model"] in args.skip_models or (args.sections and cfg["section"] not in args.sections):
      continue
    elapsed = time.perf_counter() - t_start
    if elapsed > args.budget_s:
      res["skipped"].append(cfg)
      continue
    train = "train" in cfg.get("what", ("train",))
    key = (cfg["model"], cfg["dtype"], cfg.get("circulant"), train)
    entry = dict(cfg)
    try:
      if key not in flops_cache:
        flops_cache[key] = flops_per_image(cfg, args.smoke, train)
      entry["flops_per_image"] = flops_cache[key]
    except Exception as err:  # noqa: BLE001
      entry["flops_error"] = f"{type(err).__name__}: {err}"
    impl = cfg.get("impl")
    with attention.use_implementation(impl) if impl else _nullcontext():
      entry.update(measure(cfg, args, mem, rng))
    for what in ("fwd", "train"):
      r, fl = entry.get(what, {}), entry.get("flops_per_image", {}).get(what)
      if "img_s" in r and fl:
        achieved = fl * r["img_s"]
        r["tflop_s"] = achieved / 1e12
        r["mfu_peak"] = achieved / res["peaks"][cfg["dtype"]] if res["peaks"][cfg["dtype"]] else None
        r["mfu_gemm"] = achieved / res["gemm"][cfg["dtype"]]
    res["configs"].append(entry)
    print(f"[{time.perf_counter() - t_start:6.1f}s] {summary_line(entry)}", file=sys.stderr, flush=True)
    res["elapsed_s"] = time.perf_counter() - t_start
    if out_dir is not None:
      write(res, out_dir)
  res["elapsed_s"] = time.perf_counter() - t_start
  if out_dir is not None:
    write(res, out_dir)
  return res


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def label(cfg: dict) -> str:
  extra = [f"attention={cfg['impl']}"] if cfg.get("impl") else []
  extra += [f"circulant={cfg['circulant']}"] if cfg.get("circulant") else []
  return " ".join([cfg["model"], cfg["dtype"], *extra])


def summary_line(e: dict) -> str:
  parts = [label(e)]
  for what in ("fwd", "train"):
    r = e.get(what, {})
    parts.append(f"{what}: " + (f"{r['img_s']:.1f} img/s @ {r['batch']} (compile {r['compile_s']:.1f}s, "
                                f"{r['kernel']})" if "img_s" in r else r.get("error", "-")))
  return " | ".join(parts)


def _pct(v):
  return "-" if v is None else f"{100 * v:.0f}%"


def markdown(res: dict) -> str:
  g = res["gemm"]
  mem = "-" if not res["memory_bytes"] else f"{res['memory_bytes'] / 2 ** 30:.0f} GiB"
  lines = [f"# Device check: {res['device_kind']} ({res['backend']})", "",
           f"`python benchmarks/device_check.py{' --smoke' if res['smoke'] else ''}` - {res['started']}, jax "
           f"{res['jax']}, {res.get('elapsed_s', 0):.0f} s (budget {res['budget_s']:.0f} s). Device memory: "
           f"{mem}. "
           f"Peak (table): bf16 {_tf(res['peaks']['bf16'])}, fp32 {_tf(res['peaks']['fp32'])} TFLOP/s; measured "
           f"GEMM: bf16 {g['bf16'] / 1e12:.1f}, fp32 {g['fp32'] / 1e12:.1f} TFLOP/s. Attention default on this "
           f"backend (`attention.AUTO_IMPL`): {res['attention_auto_impl']!r}.", "",
           "img/s: median over timed calls; MFU: XLA-counted FLOPs (lowered, blocks unrolled) x img/s / peak "
           "(table) and / measured GEMM; compile: XLA compile (s) of the forward; train step; kernel: "
           "attention kernel in the compiled program (cudnn = cuDNN's fused custom call).", "",
           "| section | configuration | batch fwd; train | fwd img/s | train img/s | MFU fwd; train (peak) | "
           "MFU fwd; train (GEMM) | compile fwd; train s | kernel |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for e in res["configs"]:
    f, t = e.get("fwd", {}), e.get("train", {})
    img = lambda r: f"{r['img_s']:.1f}" if "img_s" in r else ("error" if "error" in r else "-")
    cs = lambda r: f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    lines.append(f"| {e['section']} | {label(e)} | {f.get('batch', '-')}; {t.get('batch', '-')} | {img(f)} | "
                 f"{img(t)} | {_pct(f.get('mfu_peak'))}; {_pct(t.get('mfu_peak'))} | {_pct(f.get('mfu_gemm'))}; "
                 f"{_pct(t.get('mfu_gemm'))} | {cs(f)}; {cs(t)} | {f.get('kernel', '-')}; {t.get('kernel', '-')} |")
  errors = [(label(e), w, e[w]["error"]) for e in res["configs"] for w in ("fwd", "train") if "error" in e.get(w, {})]
  if errors:
    lines += ["", "Errors:", ""] + [f"- {c} {w}: {msg}" for c, w, msg in errors]
  if res["skipped"]:
    lines += ["", "Skipped (budget): " + ", ".join(label(c) for c in res["skipped"])]
  lines += ["", "Ratios (train step img/s; > 1: the first is faster):", ""] + ratio_lines(res)
  return "\n".join(lines) + "\n"


def _tf(v):
  return "-" if v is None else f"{v / 1e12:.0f}"


def ratio_lines(res: dict) -> list[str]:
  by = {label(e): e for e in res["configs"]}
  out = []
  for e in res["configs"]:
    if e["section"] == "attention" and e["impl"] != "explicit":
      base = by.get(label(dict(e, impl="explicit")))
      out += _ratio(e, base, f"{e['model']} {e['dtype']}: fused {e['impl']} / explicit")
    if e["section"] == "circulant" and e["circulant"] == "fft":
      base = by.get(label(dict(e, circulant="dense")))
      out += _ratio(e, base, f"augvit {e['dtype']}: FFT / dense circulant")
  return out or ["- (none measured)"]


def _ratio(e, base, text) -> list[str]:
  if not base:
    return []
  vals = []
  for what in ("fwd", "train"):
    a, b = e.get(what, {}).get("img_s"), base.get(what, {}).get("img_s")
    vals.append(f"{what} {a / b:.2f}x" if a and b else f"{what} -")
  return [f"- {text}: " + ", ".join(vals)]


def write(res: dict, out_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "device_check.json").write_text(json.dumps(res, indent=1, default=str))
  (out_dir / "device_check.md").write_text(markdown(res))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny models, batch 2, one call each (CPU, seconds)")
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>; --smoke: none)")
  p.add_argument("--budget-s", type=float, default=400.0, help="skip configurations started after this many s")
  p.add_argument("--sections", nargs="*", default=None, help="only these: throughput attention circulant")
  p.add_argument("--skip-models", nargs="*", default=[], help=f"among {' '.join(MODELS)}")
  args = p.parse_args(argv)
  if not args.smoke and jax.default_backend() == "cpu":
    print("device_check: no GPU or TPU found (jax.default_backend() == 'cpu'); the full check is for "
          "accelerators, use --smoke on a CPU", file=sys.stderr)
    raise SystemExit(2)
  res = run(args)
  print(markdown(res))
  return res


if __name__ == "__main__":
  main()
