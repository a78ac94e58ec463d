"""CPU speed of vit_jax_fix against the PyTorch models with the same weights, side by side in one run.

    python benchmarks/speed.py                 # full run (about 20-25 min on the 2-core CPU machine)
    python benchmarks/speed.py --quick         # 2 models, 32 px, tiny batch (< 3 min): checks the script
    python benchmarks/speed.py --models deit augvit_fft evit_0.7 --batch 8 --out benchmarks/results/speed

Per case, two subprocesses run one after the other (each reports its own peak memory):

1. JAX worker: builds our model (random init, AttnScale/FeatScale gains randomised so that parity is not
   trivial; blocks in the trainer's parameter layout, `param_layout='stacked'`), exports its weights (`to_torch_state_dict`, layout 'timm' for DeiT/DeiT III/CaiT, 'official'
   otherwise), measures jit lower and compile time separately, XLA cost-analysis FLOPs, inference and
   fp32 AdamW + cross-entropy train-step throughput (`jax.jit` on the `nnx.split` state, donated, timed
   with `block_until_ready`), the GEMM rate of a large fp32 matmul in the same process, and the peak RSS.
2. torch worker (`torch.set_num_threads(os.cpu_count())`): builds the timm twin
   (`vit_jax_fix.interop.timm_models.create_timm_model`) or the reference module of
   `benchmarks/torch_reference.py`, loads the exported weights with `load_state_dict(strict=True)`, checks
   the logits against ours on the same images (max abs diff in the table) and only then times the eval
   forward (`inference_mode`) and the train step (AdamW, cross-entropy, same batch); also a torch GEMM.

Timings: warm-up, then the median of N iterations (seconds per batch -> images/s). Peak memory: the
process's `resource.getrusage(RUSAGE_SELF).ru_maxrss` (JAX has no memory stats on CPU), reported as the
peak minus the RSS right after the imports. MFU = XLA-counted FLOPs per image x images/s / GEMM rate
of the same process (for torch: our XLA count of the same function, divided by torch's GEMM rate).
Both workers run with huge-page malloc (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, as `main.py` does on a
CPU-only install; `--malloc default` leaves the environment as it is); the page faults per train step are
in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from vit_jax_fix import hostmem

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402
DEIT_S = "deit_small_patch16_224"
EVIT = "deit_small_patch16_shrink_base"

# name -> (registered model, overrides, torch side: 'timm' | 'ref' | 'ref-deit' | None, extra)
CASES = {
    "deit": (DEIT_S, {}, "timm", {}),
    "deit_vs_official": (DEIT_S, {}, "ref", {}),
    "deit3": ("deit_small_patch16_LS", {}, "timm", {}),
    "cait_xxs24": ("cait_XXS24_224", {}, "timm", {}),
    "augvit_fft": ("augvit_small_circulant2", {"circulant_impl": "fft"}, "ref", {}),
    "augvit_dense": ("augvit_small_circulant2", {"circulant_impl": "dense"}, "ref", {}),
    "deepvit_16b": ("deepvit_patch16_224_re_attn_16b", {}, "ref", {}),
    "attnscale": ("attnscale_small_12", {}, "ref", {}),
    "featscale_fft": ("featscale_small_12", {"feat_scale_impl": "fft"}, "ref", {}),
    "featscale_mean": ("featscale_small_12", {"feat_scale_impl": "mean"}, "ref", {}),
    **{f"evit_{k}": (EVIT, {"keep_rate": k}, "ref", {}) for k in (0.5, 0.6, 0.7, 0.8, 0.9)},
    "deit_bf16": (DEIT_S, {"dtype": "bfloat16"}, "timm", {"torch_bf16": True}),
    "shunted_t": ("shunted_t", {}, "ref", {}),
}
# Most informative first: results are written after every case, so a run cut short still reports them.
FULL = ["deit", "augvit_fft", "augvit_dense", "evit_0.7", "deit3", "cait_xxs24", "deepvit_16b", "attnscale",
        "featscale_fft", "featscale_mean", "deit_bf16", "compile", "evit_0.5", "evit_0.9", "evit_0.6", "evit_0.8",
        "deit_vs_official", "shunted_t"]
QUICK = ["deit", "evit_0.7"]  # a smoke run of the script; the full run covers every case
DEPTHS = (12, 24, 32)


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def minor_faults() -> int:
  """Page faults served without I/O so far: fresh memory touched for the first time (see hostmem.py)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_time(fn, warmup: int, iters: int) -> tuple[float, list[float]]:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def quick_overrides(args) -> dict:
  return dict(img_size=32, patch_size=4) if args.quick else {}


def _overrides(case, args):
  name, ov, _, _ = CASES[case]
  ov = dict(ov, **quick_overrides(args))
  if args.quick and name.startswith("shunted"):
    ov.pop("patch_size")
  return name, ov


# ----------------------------------------------------------------------------------------------- JAX worker
def jax_gemm(n: int = 2048, iters: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t, _ = median_time(lambda: f(a, b).block_until_ready(), 2, iters)
  return 2 * n ** 3 / t


# XLA's cost analysis counts a loop body once, so scanned blocks (the default) would be undercounted:
# the forward count unrolls them (vit_jax_fix.models.cost.xla_flops) and a train step is counted as
# 3 x forward (backward = 2 x forward), the usual convention.
TRAIN_FLOPS_PER_FWD = 3.0


def jax_worker(job: dict) -> dict:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  import vit_jax_fix
  from vit_jax_fix.interop.state_dict import to_torch_state_dict
  from vit_jax_fix.interop.timm_models import default_layout
  from vit_jax_fix.models.vit import with_param_layout
  base_rss = rss_mb()
  out = {"rss_after_imports_mb": base_rss}
  name, ov = job["name"], dict(job["overrides"])
  if ov.get("dtype") == "bfloat16":
    ov["dtype"] = jnp.bfloat16
  b, steps = job["batch"], job["iters"]
  model = vit_jax_fix.create_model(name, **ov)
  # Non-zero AttnScale / FeatScale gains and BatchNorm statistics, so that parity checks the fixes' math.
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and path and str(path[-1]) in ("lamb", "lamb1", "lamb2"):
      var.set_value(jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32))
    if isinstance(var, nnx.BatchStat) and str(path[-1]) == "var":
      var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, var.shape), jnp.float32))
    if isinstance(var, nnx.BatchStat) and str(path[-1]) == "mean":
      var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32))
  # The layout the trainer uses: scanned blocks' parameters stacked (ViT backbone; Shunted has no option).
  model = with_param_layout(model, "stacked")
  size = getattr(model, "img_size", job["img"])
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  x = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
  ncls = int(getattr(model, "num_classes", 1000))
  y = jnp.asarray(rng.integers(0, ncls, size=(b,)))

  # --- inference
  model.eval()
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  t0 = time.perf_counter()
  lowered = fwd.lower(state, x)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  from vit_jax_fix.models.cost import xla_flops
  out.update(fwd_lower_s=t1 - t0, fwd_compile_s=t2 - t1, fwd_flops=xla_flops(model, x.shape))
  logits = compiled(state, x)
  logits.block_until_ready()
  t_fwd, ts = median_time(lambda: compiled(state, x).block_until_ready(), job["warmup"], steps)
  out.update(fwd_s=t_fwd, fwd_times=ts, fwd_img_s=b / t_fwd)
  if job.get("export"):
    layout = default_layout(name, **{k: v for k, v in job["overrides"].items() if k != "dtype"})
    sd = to_torch_state_dict(model, layout=layout)
    np.savez(job["export"], **{"sd/" + k: v for k, v in sd.items()}, x=np.asarray(x).transpose(0, 3, 1, 2),
             y=np.asarray(y), logits=np.asarray(logits, np.float32))
    out["layout"] = layout
  if job.get("ref_fp32"):
    # bf16 row: logits of the fp32 model with the same weights.
    fp32 = with_param_layout(vit_jax_fix.create_model(name, **{k: v for k, v in ov.items() if k != "dtype"}),
                             "stacked")
    fp32.eval()
    nnx.update(fp32, nnx.state(model))
    l32 = fp32(x)
    out["bf16_vs_fp32_max_abs"] = float(jnp.max(jnp.abs(logits.astype(jnp.float32) - l32)))
    out["bf16_vs_fp32_rel"] = out["bf16_vs_fp32_max_abs"] / float(jnp.max(jnp.abs(l32)))
    out["bf16_top1_agree"] = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(l32, -1)))
    del fp32
  del compiled, logits

  # --- train step (fp32 params, AdamW, cross-entropy), functional on the nnx.split state, donated
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = tx.init(params)

  from train_step import functional_train_step   # benchmarks/ is on sys.path
  train_step = functional_train_step(graphdef, tx)

  step = jax.jit(train_step, donate_argnums=(0, 1, 2))
  t0 = time.perf_counter()
  lowered = step.lower(params, rest, opt_state, x, y)
  t1 = time.perf_counter()
  cstep = lowered.compile()
  t2 = time.perf_counter()
  out.update(train_lower_s=t1 - t0, train_compile_s=t2 - t1,
             train_flops=TRAIN_FLOPS_PER_FWD * out["fwd_flops"])
  carry = [params, rest, opt_state]

  def one():
    p, r, o, loss = cstep(*carry, x, y)
    loss.block_until_ready()
    carry[:] = [p, r, o]
    return loss

  loss0 = float(one())
  faults = minor_faults()
  t_train, ts = median_time(one, job["train_warmup"], job["train_iters"])
  out.update(train_s=t_train, train_times=ts, train_img_s=b / t_train, loss0=loss0,
             train_faults_per_step=(minor_faults() - faults) / (job["train_warmup"] + job["train_iters"]))
  out["peak_rss_mb"] = rss_mb()
  out["gemm_flops_s"] = jax_gemm(job["gemm_n"])
  out["mfu_fwd"] = out["fwd_flops"] / b * out["fwd_img_s"] / out["gemm_flops_s"]
  out["mfu_train"] = out["train_flops"] / b * out["train_img_s"] / out["gemm_flops_s"]
  return out


def compile_worker(job: dict) -> dict:
  """Lower/compile time (forward and train step) of DeiT-S at several depths; nothing is run."""
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  import jax.numpy as jnp
  import optax
  from flax import nnx
  import vit_jax_fix
  out = {}
  for depth in job["depths"]:
    model = nnx.eval_shape(lambda: vit_jax_fix.create_model(DEIT_S, depth=depth, param_layout=job["param_layout"],
                                                            **job["overrides"]))
    img = model.img_size
    x = jax.ShapeDtypeStruct((job["batch"], *img, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((job["batch"],), jnp.int32)
    model.eval()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    t0 = time.perf_counter()
    lo = fwd.lower(state, x)
    t1 = time.perf_counter()
    lo.compile()
    t2 = time.perf_counter()
    n_hlo = lo.as_text().count("\n")
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.05)

    def train_step(params, rest, opt_state, x, y, graphdef=graphdef):
      def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.eval_shape(tx.init, params)
    t3 = time.perf_counter()
    lt = jax.jit(train_step, donate_argnums=(0, 2)).lower(params, rest, opt_state, x, y)
    t4 = time.perf_counter()
    lt.compile()
    t5 = time.perf_counter()
    out[str(depth)] = dict(fwd_lower_s=t1 - t0, fwd_compile_s=t2 - t1, train_lower_s=t4 - t3,
                           train_compile_s=t5 - t4, fwd_hlo_lines=n_hlo, train_hlo_lines=lt.as_text().count("\n"))
    print(f"  depth {depth}: {out[str(depth)]}", file=sys.stderr, flush=True)
  return out


# --------------------------------------------------------------------------------------------- torch worker
def torch_gemm(torch, n: int = 2048, iters: int = 10) -> float:
  a = torch.randn(n, n)
  b = torch.randn(n, n)
  a @ b
  t, _ = median_time(lambda: a @ b, 2, iters)
  return 2 * n ** 3 / t


def torch_worker(job: dict) -> dict:
  import numpy as np
  import torch
  torch.set_num_threads(os.cpu_count())
  from vit_jax_fix.interop.torch_compat import import_timm
  import_timm()
  import torch_reference
  import torch.nn.functional as F
  base_rss = rss_mb()
  out = {"rss_after_imports_mb": base_rss, "torch_threads": torch.get_num_threads()}
  name, ov = job["name"], {k: v for k, v in job["overrides"].items() if k != "dtype"}
  data = np.load(job["export"])
  sd = {k[3:]: torch.from_numpy(np.array(data[k])) for k in data.files if k.startswith("sd/")}
  x = torch.from_numpy(np.ascontiguousarray(data["x"]))
  y = torch.from_numpy(np.array(data["y"])).long()
  if job["torch"] == "timm":
    from vit_jax_fix.interop.timm_models import create_timm_model
    model = create_timm_model(name, **ov)
    out["torch_model"] = f"timm {type(model).__name__}"
  else:
    model = torch_reference.reference_for(name, **ov)
    out["torch_model"] = f"benchmarks/torch_reference.{type(model).__name__}"
  model.load_state_dict(sd, strict=True)
  model.eval()
  bf16 = job.get("torch_bf16", False)
  with torch.inference_mode():
    ref = model(x).float().numpy()
  out["max_abs_diff"] = float(np.max(np.abs(ref - data["logits"])))
  out["logit_scale"] = float(np.max(np.abs(ref)))
  out["top1_agree"] = float(np.mean(ref.argmax(-1) == data["logits"].argmax(-1)))
  b = x.shape[0]

  def fwd():
    with torch.inference_mode():
      if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
          model(x)
      else:
        model(x)

  t_fwd, ts = median_time(fwd, job["warmup"], job["iters"])
  out.update(fwd_s=t_fwd, fwd_times=ts, fwd_img_s=b / t_fwd)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

  def step():
    opt.zero_grad(set_to_none=True)
    if bf16:
      with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    else:
      logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return loss

  out["loss0"] = float(step())
  faults = minor_faults()
  t_train, ts = median_time(step, job["train_warmup"], job["train_iters"])
  out.update(train_s=t_train, train_times=ts, train_img_s=b / t_train,
             train_faults_per_step=(minor_faults() - faults) / (job["train_warmup"] + job["train_iters"]))
  out["peak_rss_mb"] = rss_mb()
  out["gemm_flops_s"] = torch_gemm(torch, job["gemm_n"])
  return out


# --------------------------------------------------------------------------------------------------- driver
# How the workers' malloc gets memory (`--malloc`): both frameworks always run under the same setting.
MALLOC = {"mode": "hugetlb"}


def run_worker(kind: str, job: dict, timeout: float) -> dict:
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(job, f)
    path = f.name
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if MALLOC["mode"] == "hugetlb":
    env = hostmem.env_with_huge_pages(env)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--job", path], capture_output=True,
                        text=True, timeout=timeout, env=env)
  os.unlink(path)
  if proc.returncode != 0:
    tail = (proc.stderr or "")[-3000:]
    return {"error": f"{kind} worker failed (rc {proc.returncode}): {tail.strip().splitlines()[-1] if tail.strip() else ''}",
            "stderr_tail": tail}
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["wall_s"] = time.perf_counter() - t0
  return res


def run_env_tunables() -> str:
  env = hostmem.env_with_huge_pages() if MALLOC["mode"] == "hugetlb" else os.environ
  return env.get("GLIBC_TUNABLES", "")


def loadavg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def fmt(v, spec=".1f", none="-"):
  return none if v is None or v != v else format(v, spec)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="2 models at 32 px, batch 2, few iterations (< 3 min)")
  p.add_argument("--models", nargs="*", default=None, help=f"cases among: {' '.join(CASES)} (and 'compile')")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --quick: 2)")
  p.add_argument("--iters", type=int, default=None, help="timed forward iterations (default 7)")
  p.add_argument("--train-iters", type=int, default=None, help="timed train steps (default 5)")
  p.add_argument("--param-layout", default="stacked", choices=("stacked", "per_block"),
                 help="parameter layout of the 'compile' case (the trainer's is 'stacked')")
  p.add_argument("--malloc", default="hugetlb", choices=("hugetlb", "default"),
                 help="workers' glibc malloc: 'hugetlb' = GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as main.py "
                      "runs on a CPU-only install (vit_jax_fix/hostmem.py); 'default' = as inherited")
  p.add_argument("--out", default="benchmarks/results/speed", help="output prefix (.md and .json)")
  p.add_argument("--worker", choices=("jax", "torch", "compile"), help=argparse.SUPPRESS)
  p.add_argument("--job", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    job = json.loads(pathlib.Path(args.job).read_text())
    res = {"jax": jax_worker, "torch": torch_worker, "compile": compile_worker}[args.worker](job)
    print(json.dumps(res))
    return

  MALLOC["mode"] = args.malloc
  cases = args.models or (QUICK + ["compile"] if args.quick else FULL)
  unknown = [c for c in cases if c not in CASES and c != "compile"]
  if unknown:
    p.error(f"unknown cases {unknown}; choose among {list(CASES)} and 'compile'")
  batch = args.batch or (2 if args.quick else 8)
  common = dict(batch=batch, warmup=1 if args.quick else 2, iters=args.iters or (3 if args.quick else 5),
                train_warmup=1, train_iters=args.train_iters or (2 if args.quick else 4),
                gemm_n=1024 if args.quick else 2048, img=32 if args.quick else 224)
  import platform
  meta = dict(command=" ".join([os.path.basename(sys.executable), "benchmarks/speed.py"] + sys.argv[1:]),
              cpu_count=os.cpu_count(), platform=platform.platform(), processor=machine.cpu_name(), batch=batch,
              quick=args.quick, started=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_start=loadavg(),
              malloc=args.malloc, glibc_tunables=run_env_tunables(), transparent_hugepage=hostmem.thp_mode(),
              versions=_versions(), **{k: common[k] for k in ("warmup", "iters", "train_warmup", "train_iters",
                                                                "gemm_n")})
  print(f"load average at start: {meta['loadavg_start']}", flush=True)
  rows, torch_cache, jax_cache = [], {}, {}
  tmpdir = tempfile.mkdtemp(prefix="speed_")
  compile_res = None
  for case in cases:
    if case == "compile":
      print("compile time vs depth ...", flush=True)
      ov = quick_overrides(args)
      depths = (1, 2) if args.quick else DEPTHS
      compile_res = run_worker("compile", dict(common, depths=depths, overrides=ov,
                                               param_layout=args.param_layout), 1800)
      compile_res["loadavg"] = loadavg()
      compile_res["param_layout"] = args.param_layout
      print(json.dumps(compile_res), flush=True)
      write(args.out, meta, rows, compile_res)
      continue
    name, ov = _overrides(case, args)
    torch_kind, extra = CASES[case][2], CASES[case][3]
    export = os.path.join(tmpdir, f"{case}.npz")
    job = dict(common, name=name, overrides=ov, export=export if torch_kind else None, torch=torch_kind,
               ref_fp32=ov.get("dtype") == "bfloat16", **extra)
    jkey = (name, json.dumps({k: str(v) for k, v in ov.items()}, sort_keys=True))
    if jkey in jax_cache:
      # Same JAX model (e.g. DeiT-S against timm and against the official explicit-attention code).
      jr = dict(jax_cache[jkey][0], reused_from=jax_cache[jkey][1])
      export = job["export"] = jax_cache[jkey][2]
    else:
      print(f"[{case}] {name} {ov}: JAX ...", flush=True)
      jr = run_worker("jax", job, 1800)
      jr["loadavg"] = loadavg()
      jax_cache[jkey] = (jr, case, export)
    tr = None
    if torch_kind and "error" not in jr:
      key = (name, json.dumps({k: v for k, v in ov.items() if k not in ("circulant_impl", "feat_scale_impl")},
                              sort_keys=True), torch_kind, json.dumps(extra, sort_keys=True))
      if key in torch_cache:
        # Same torch function (AugViT FFT vs dense, FeatScale FFT vs mean: the reference is the official
        # form); only the parity check is redone against this JAX variant.
        tr = dict(torch_cache[key])
        tr["reused_from"] = tr.get("case")
        tr.update(_parity_only(export, torch_kind, name, ov))
      else:
        print(f"[{case}] torch ({torch_kind}) ...", flush=True)
        tr = run_worker("torch", job, 1800)
        tr["case"] = case
        tr["loadavg"] = loadavg()
        torch_cache[key] = tr
    row = dict(case=case, model=name, overrides={k: str(v) for k, v in ov.items()}, torch_side=torch_kind,
               jax=jr, torch=tr)
    rows.append(row)
    print("   " + _row_line(row), flush=True)
    write(args.out, meta, rows, compile_res)
  md = write(args.out, meta, rows, compile_res)
  print(md)


def write(prefix, meta, rows, compile_res) -> str:
  """(Re)write the JSON and markdown after every case, so that an interrupted run keeps what it measured."""
  meta["loadavg_end"] = loadavg()
  meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  result = dict(meta=meta, rows=rows, compile=compile_res)
  out = pathlib.Path(prefix)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  md = render(result)
  out.with_suffix(".md").write_text(md)
  return md


def _parity_only(export, torch_kind, name, ov) -> dict:
  """Logit check of a JAX variant against the (already timed) torch model, in a short subprocess."""
  code = (
      "import json,sys,numpy as np,torch;sys.path.insert(0,%r);sys.path.insert(0,%r)\n"
      "from vit_jax_fix.interop.torch_compat import import_timm; import_timm()\n"
      "import torch_reference\n"
      "d=np.load(%r); sd={k[3:]:torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith('sd/')}\n"
      "m=torch_reference.reference_for(%r, **%r) if %r!='timm' else __import__('vit_jax_fix.interop.timm_models',"
      "fromlist=['x']).create_timm_model(%r, **%r)\n"
      "m.load_state_dict(sd, strict=True); m.eval()\n"
      "with torch.inference_mode(): r=m(torch.from_numpy(np.ascontiguousarray(d['x']))).numpy()\n"
      "print(json.dumps(dict(max_abs_diff=float(np.abs(r-d['logits']).max()), logit_scale=float(np.abs(r).max()),"
      "top1_agree=float(np.mean(r.argmax(-1)==d['logits'].argmax(-1))))))\n"
  ) % (str(ROOT), str(ROOT / "benchmarks"), export, name,
       {k: v for k, v in ov.items() if k != "dtype"}, torch_kind, name, {k: v for k, v in ov.items() if k != "dtype"})
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  if proc.returncode:
    return {"max_abs_diff": float("nan"), "parity_error": proc.stderr[-500:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict:
  from importlib.metadata import version
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "timm"):
    try:
      out[pkg] = version(pkg)
    except Exception:  # noqa: BLE001
      out[pkg] = None
  return out


def _ratio(a, b):
  return a / b if a and b else None


def _row_line(r) -> str:
  j, t = r["jax"], r["torch"] or {}
  if "error" in j:
    return f"JAX error: {j['error']}"
  s = f"JAX fwd {j['fwd_img_s']:.2f} img/s, train {j['train_img_s']:.2f} img/s"
  if t and "error" not in t:
    s += (f" | torch fwd {t['fwd_img_s']:.2f}, train {t['train_img_s']:.2f} | diff {t['max_abs_diff']:.2e}"
          f" | x{_ratio(j['fwd_img_s'], t['fwd_img_s']):.2f} / x{_ratio(j['train_img_s'], t['train_img_s']):.2f}")
  elif t:
    s += f" | torch error: {t['error']}"
  return s


def render(result) -> str:
  meta, rows = result["meta"], result["rows"]
  L = [f"# Speed: vit_jax_fix (JAX {meta['versions']['jax']}, Flax {meta['versions']['flax']}) vs PyTorch "
       f"{meta['versions']['torch']} / timm {meta['versions']['timm']}", "",
       f"`{meta['command']}` — {meta['started']} to {meta['finished']}, {meta['processor']}, "
       f"{meta['cpu_count']} cores, batch {meta['batch']}, fp32 unless noted. **Load average** (1, 5, 15 min) "
       f"at start {meta['loadavg_start']}, at end {meta['loadavg_end']} (other jobs shared the machine; "
       f"per-row load in the JSON). **malloc** (both frameworks): "
       f"GLIBC_TUNABLES={meta.get('glibc_tunables') or '(unset)'}, transparent huge pages "
       f"'{meta.get('transparent_hugepage', '?')}' (page faults per train step in the JSON).", "",
       f"Median of {meta['iters']} forward passes / {meta['train_iters']} train steps after warm-up. "
       "img/s: images per second; x: JAX / torch. Train step: AdamW + cross-entropy, fp32, same batch. "
       "Compile = jit lower + XLA compile (forward; train step). Peak RSS: process peak minus RSS after imports "
       "(MB). MFU: XLA-counted FLOPs x img/s / GEMM rate of the same process. diff: max |logit_JAX - "
       "logit_torch| on the same images and weights (logit scale in the JSON).", ""]
  L += ["| case | torch side | diff | JAX fwd img/s | torch fwd img/s | fwd x | JAX train img/s | torch train img/s "
        "| train x | compile fwd; train s | GFLOP/img fwd | MFU fwd; train | peak RSS JAX; torch MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    j, t = r["jax"], r["torch"] or {}
    if "error" in j:
      L.append(f"| {r['case']} | | | JAX error: {j['error']} |||||||||")
      continue
    side = {"timm": "timm", "ref": "reference (official form)", None: "-"}[r["torch_side"]]
    if t.get("reused_from"):
      side += f" (timed in {t['reused_from']})"
    if t and "error" in t:
      side += f" ERROR {t['error'][:80]}"
    diff = fmt(t.get("max_abs_diff"), ".1e")
    L.append("| " + " | ".join([
        f"{r['case']} (`{r['model']}`{_ov(r)})", side, diff,
        fmt(j["fwd_img_s"], ".2f"), fmt(t.get("fwd_img_s"), ".2f"), fmt(_ratio(j["fwd_img_s"], t.get("fwd_img_s")), ".2f"),
        fmt(j["train_img_s"], ".2f"), fmt(t.get("train_img_s"), ".2f"),
        fmt(_ratio(j["train_img_s"], t.get("train_img_s")), ".2f"),
        f"{j['fwd_lower_s'] + j['fwd_compile_s']:.1f}; {j['train_lower_s'] + j['train_compile_s']:.1f}",
        fmt(j["fwd_flops"] / meta["batch"] / 1e9, ".2f"),
        f"{100 * j['mfu_fwd']:.0f}%; {100 * j['mfu_train']:.0f}%",
        f"{j['peak_rss_mb'] - j['rss_after_imports_mb']:.0f}; "
        + (fmt(t['peak_rss_mb'] - t['rss_after_imports_mb'], '.0f') if t and 'peak_rss_mb' in t else "-"),
    ]) + " |")
  gj = [r["jax"]["gemm_flops_s"] for r in rows if "gemm_flops_s" in r["jax"]]
  gt = [r["torch"]["gemm_flops_s"] for r in rows if r["torch"] and "gemm_flops_s" in r["torch"]]
  if gj:
    L += ["", f"GEMM rate ({meta['gemm_n']}^3 fp32 matmul, median over the workers): JAX "
          f"{statistics.median(gj) / 1e9:.0f} GFLOP/s (range {min(gj) / 1e9:.0f}-{max(gj) / 1e9:.0f})"
          + (f", torch {statistics.median(gt) / 1e9:.0f} GFLOP/s (range {min(gt) / 1e9:.0f}-{max(gt) / 1e9:.0f})"
             if gt else "") + "."]
  bf = [r for r in rows if "bf16_vs_fp32_max_abs" in r["jax"]]
  for r in bf:
    L.append(f"bf16 ({r['case']}): max |logit_bf16 - logit_fp32| = {r['jax']['bf16_vs_fp32_max_abs']:.3g} "
             f"({100 * r['jax']['bf16_vs_fp32_rel']:.2g}% of the largest logit), top-1 agreement "
             f"{100 * r['jax']['bf16_top1_agree']:.0f}% (torch side: timm under torch.autocast bf16; its diff column "
             "compares torch bf16 to JAX bf16).")
  L += ceiling_lines(rows, meta["batch"])
  # specific comparisons
  by = {r["case"]: r["jax"] for r in rows if "error" not in r["jax"]}
  base = by.get("deit")
  if base:
    L += ["", "Relative to DeiT-S in JAX (same run): step time = 1 / train img/s.", "",
          "| case | fwd speed vs DeiT-S | train-step time vs DeiT-S |", "|---|---:|---:|"]
    for c, j in by.items():
      if c == "deit":
        continue
      L.append(f"| {c} | {j['fwd_img_s'] / base['fwd_img_s']:.2f}x | {base['train_img_s'] / j['train_img_s']:.2f}x |")
  comp = result.get("compile")
  if comp and "error" not in comp:
    ds = [d for d in comp if str(d).isdigit()]
    L += ["", f"Compile time vs depth (DeiT-S width, param_layout={comp.get('param_layout', 'per_block')!r}, nothing "
          "run; seconds; HLO lines of the lowered module):", "",
          "| depth | fwd lower | fwd compile | train lower | train compile | fwd HLO lines | train HLO lines |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for d in ds:
      c = comp[d]
      L.append(f"| {d} | {c['fwd_lower_s']:.2f} | {c['fwd_compile_s']:.2f} | {c['train_lower_s']:.2f} | "
               f"{c['train_compile_s']:.2f} | {c['fwd_hlo_lines']} | {c['train_hlo_lines']} |")
    if len(ds) >= 2:
      a, z = comp[ds[0]], comp[ds[-1]]
      tot = lambda c, k: c[f"{k}_lower_s"] + c[f"{k}_compile_s"]
      L.append(f"\nDepth {ds[-1]} / depth {ds[0]} (lower + compile): forward "
               f"{tot(z, 'fwd') / tot(a, 'fwd'):.2f}x, train step {tot(z, 'train') / tot(a, 'train'):.2f}x.")
  elif comp:
    L.append(f"\ncompile worker error: {comp['error']}")
  return "\n".join(L) + "\n"


def ceiling_lines(rows, batch: int, fwd_target: float = 1.5, train_target: float = 1.3) -> list[str]:
  """What issue #9's targets (JAX >= 1.5x PyTorch forward, >= 1.3x train step) ask of this machine: the MFU
  PyTorch reached (the XLA-counted FLOPs over torch's own GEMM rate) and the MFU JAX would need to reach the
  target (over JAX's GEMM rate). A need above 100% cannot be met by any kernel on this CPU. fp32 rows only."""
  out = []
  for r in rows:
    j, t = r["jax"], r["torch"] or {}
    if "error" in j or not t or "error" in t or "gemm_flops_s" not in t or "bf16_vs_fp32_max_abs" in j:
      continue
    per_img = {k: j[f"{k}_flops"] / batch for k in ("fwd", "train")}
    torch_mfu = {k: t[f"{k}_img_s"] * per_img[k] / t["gemm_flops_s"] for k in per_img}
    need = {k: target * t[f"{k}_img_s"] * per_img[k] / j["gemm_flops_s"]
            for k, target in (("fwd", fwd_target), ("train", train_target))}
    out.append(f"| {r['case']} | {100 * torch_mfu['fwd']:.0f}%; {100 * torch_mfu['train']:.0f}% | "
               f"{100 * j['mfu_fwd']:.0f}%; {100 * j['mfu_train']:.0f}% | "
               f"{100 * need['fwd']:.0f}%; {100 * need['train']:.0f}% |")
  if not out:
    return []
  return ["", f"What the targets ask of this CPU: MFU of PyTorch (XLA-counted FLOPs x img/s / torch's GEMM rate), "
          f"of JAX, and the MFU JAX would need for {fwd_target}x PyTorch's forward and {train_target}x its train "
          "step (over JAX's GEMM rate; above 100% is beyond this machine's fp32 GEMM peak).", "",
          "| case | PyTorch MFU fwd; train | JAX MFU fwd; train | JAX MFU needed fwd; train |",
          "|---|---:|---:|---:|"] + out


def _ov(r) -> str:
  ov = r["overrides"]
  return (", " + ", ".join(f"{k}={v}" for k, v in ov.items())) if ov else ""


if __name__ == "__main__":
  main()
