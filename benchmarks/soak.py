"""Soak test (run by hand, not in CI): the demo config with frequent checkpoints and evals, killed and restarted
many times, recording resident memory and checkpoint disk use.

  python benchmarks/soak.py --minutes 60 --kills 12 --out benchmarks/results/soak

Each segment runs ``main.py --config configs/deit_s.py:demo`` on one workdir (checkpoint every
``--ckpt-every`` steps, eval every ``--eval-every``, ``max_to_keep`` 2, an epoch count large enough never to
finish) until a random time, then SIGKILLs it (every third kill is a SIGTERM preemption instead) and restarts
it. Every second it samples the run's RSS (the process and its children) and the size of
``<workdir>/checkpoints``. Writes ``soak.csv`` (time, segment, step, rss_mb, ckpt_mb, ckpt_steps), ``soak.png``
and ``soak.json`` (summary + pass/fail: the RSS of the last segments within 15% of the first ones, checkpoint
disk never above (max_to_keep + 1) x the largest checkpoint -- one extra while a save is in flight -- and
the final step count only going forward). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _du(path: str) -> tuple[int, list[int], int]:
  """(bytes under `path`, the complete checkpoints' steps, bytes of the largest complete checkpoint)."""
  if not os.path.isdir(path):
    return 0, [], 0
  total, per_step = 0, {}
  for d, _, files in os.walk(path):
    top = os.path.relpath(d, path).split(os.sep)[0]
    for f in files:
      try:
        size = os.path.getsize(os.path.join(d, f))
      except OSError:
        continue
      total += size
      if top.isdigit():   # a step directory: Orbax renames a checkpoint to its step once it is complete
        per_step[top] = per_step.get(top, 0) + size
  steps = sorted(int(name) for name in os.listdir(path) if name.isdigit())
  return total, steps, max(per_step.values(), default=0)


def _rss(proc: psutil.Process) -> int:
  try:
    procs = [proc] + proc.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running())
  except psutil.Error:
    return 0


def _last_step(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return 0


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--minutes", type=float, default=60.0)
  ap.add_argument("--kills", type=int, default=12, help="forced kills/restarts over the duration")
  ap.add_argument("--config", default="configs/deit_s.py:demo")
  ap.add_argument("--ckpt-every", type=int, default=20)
  ap.add_argument("--eval-every", type=int, default=50)
  ap.add_argument("--max-to-keep", type=int, default=2)
  ap.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "soak"))
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  os.makedirs(args.out, exist_ok=True)
  workdir = args.workdir or tempfile.mkdtemp(prefix="soak_")
  cache = os.path.join(tempfile.gettempdir(), "soak_jax_cache")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config", os.path.join(ROOT, args.config),
         "--workdir", workdir, "--config.num_epochs=100000", f"--config.checkpoint_every_steps={args.ckpt_every}",
         f"--config.eval_every_steps={args.eval_every}", f"--config.max_to_keep={args.max_to_keep}",
         "--config.progress_bar=False", "--config.log_every_steps=10"]
  rng = random.Random(args.seed)
  t0 = time.time()
  end = t0 + 60 * args.minutes
  seg_len = 60 * args.minutes / (args.kills + 1)
  rows, segments, one_ckpt = [], [], 0
  csv_path = os.path.join(args.out, "soak.csv")
  with open(csv_path, "w", newline="") as fcsv:
    w = csv.writer(fcsv)
    w.writerow(["t_s", "segment", "step", "rss_mb", "ckpt_mb", "ckpt_steps"])
    seg = 0
    while time.time() < end:
      last = seg >= args.kills
      stop_at = end if last else min(end, time.time() + seg_len * rng.uniform(0.6, 1.4))
      sig = signal.SIGTERM if (last or seg % 3 == 2) else signal.SIGKILL
      start_step = _last_step(workdir)
      proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
      peak = 0
      while time.time() < stop_at and proc.poll() is None:
        rss = _rss(proc)
        size, steps, largest = _du(os.path.join(workdir, "checkpoints"))
        # Checkpoint sizes vary a little with the parameter values (Orbax's OCDBT data files: 17.21 MiB at
        # step 20, 17.26 MiB at step 7,690 in one run), so the bound uses the largest complete one seen.
        one_ckpt = max(one_ckpt, largest)
        peak = max(peak, rss)
        row = [round(time.time() - t0, 1), seg, _last_step(workdir), round(rss / 2 ** 20, 1),
               round(size / 2 ** 20, 2), " ".join(map(str, steps))]
        w.writerow(row)
        rows.append(row)
        fcsv.flush()
        time.sleep(1.0)
      if proc.poll() is None:
        proc.send_signal(sig)
        try:
          proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      err = proc.stderr.read()[-2000:] if proc.stderr else ""
      segments.append({"segment": seg, "signal": signal.Signals(sig).name, "rc": proc.returncode,
                       "start_step": start_step, "end_step": _last_step(workdir), "peak_rss_mb": round(peak / 2 ** 20, 1)})
      print(json.dumps(segments[-1]), flush=True)
      if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
        print(err, file=sys.stderr)
        break
      seg += 1

  peaks = [s["peak_rss_mb"] for s in segments if s["peak_rss_mb"]]
  k = max(1, len(peaks) // 3)
  first, lastp = max(peaks[:k]), max(peaks[-k:])
  max_ckpt = max(r[4] for r in rows) if rows else 0.0
  bound = (args.max_to_keep + 1) * one_ckpt / 2 ** 20
  progress = all(s["end_step"] >= s["start_step"] for s in segments)
  summary = {
      "minutes": round((time.time() - t0) / 60, 1), "segments": len(segments), "config": args.config,
      "ckpt_every": args.ckpt_every, "eval_every": args.eval_every, "max_to_keep": args.max_to_keep,
      "final_step": _last_step(workdir), "peak_rss_first_segments_mb": first, "peak_rss_last_segments_mb": lastp,
      "one_checkpoint_mb": round(one_ckpt / 2 ** 20, 2), "max_checkpoint_dir_mb": max_ckpt,
      "checkpoint_bound_mb": round(bound, 2),
      "rss_ok": lastp <= 1.15 * first, "disk_ok": max_ckpt <= bound + 0.01, "progress_ok": progress,
      "segments_detail": segments, "workdir": workdir,
  }
  with open(os.path.join(args.out, "soak.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _plot(rows, os.path.join(args.out, "soak.png"), bound)
  print(json.dumps({k: v for k, v in summary.items() if k != "segments_detail"}, indent=2))
  sys.exit(0 if summary["rss_ok"] and summary["disk_ok"] and progress else 1)


def _plot(rows, path, bound):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not rows:
    return
  t = [r[0] / 60 for r in rows]
  fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
  ax[0].plot(t, [r[3] for r in rows], lw=0.8)
  ax[0].set_ylabel("RSS (MiB)")
  ax[1].plot(t, [r[4] for r in rows], lw=0.8)
  ax[1].axhline(bound, color="r", ls="--", lw=0.8, label="(max_to_keep + 1) x checkpoint")
  ax[1].set_ylabel("checkpoints (MiB)")
  ax[1].legend(loc="lower right")
  ax[2].plot(t, [r[2] for r in rows], lw=0.8)
  ax[2].set_ylabel("logged step")
  ax[2].set_xlabel("minutes")
  for a in ax:
    for i in range(1, len(rows)):
      if rows[i][1] != rows[i - 1][1]:
        a.axvline(t[i], color="gray", lw=0.4)
  fig.suptitle("soak: demo config, forced kills/restarts (gray lines)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)


if __name__ == "__main__":
  main()
