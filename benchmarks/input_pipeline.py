"""Input-pipeline throughput: decoded + augmented images/s (and per core) at 224 px.

Writes a folder of ImageNet-like JPEGs (random sizes around 500 x 375, smooth content so they compress like
photos), prepares it through the same tfds path as ImageNet, then times the training iterator
(``augment='deit'``: RRC + flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing, normalized NHWC float32)
and the eval iterator. Nothing is downloaded.

  python benchmarks/input_pipeline.py [--images 256] [--batch 64] [--batches 20] [--augment deit]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def make_jpegs(root: str, n: int, classes: int = 8, seed: int = 0):
  from PIL import Image
  rng = np.random.RandomState(seed)
  for i in range(n):
    w, h = int(rng.randint(400, 600)), int(rng.randint(300, 450))
    # Low-frequency colour field + mild noise: JPEG sizes close to real photos (~50-100 kB).
    small = rng.randint(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(img, np.int16) + rng.randint(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    d = os.path.join(root, f"class_{i % classes}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(arr).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def time_iterator(it, batches: int, batch: int):
  next(it)  # warm-up: tracing, file opening, shuffle-buffer fill
  t, c = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  dt, dc = time.perf_counter() - t, time.process_time() - c
  # images per CPU-second of this process: a per-core rate that other load on the machine does not deflate
  return batches * batch / dt, batches * batch / dc


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--augment", default="deit", choices=["deit", "3aug", "none"])
  p.add_argument("--workdir", default=None)
  args = p.parse_args()

  import tensorflow as tf
  from vit_jax_fix import data

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  work = args.workdir or tempfile.mkdtemp(prefix="vjf_bench_")
  root = os.path.join(work, "jpegs")
  if not os.path.isdir(root):
    make_jpegs(root, args.images)
  cfg = data.default_data_config()
  cfg.dataset, cfg.folder, cfg.data_dir = "folder", root, os.path.join(work, "tfds")
  cfg.image_size, cfg.augment, cfg.eval_split = args.size, args.augment, "train"
  cfg.shuffle_buffer, cfg.cache = 1024, True  # measure decode + augment, not disk
  data.dataset_info(cfg)  # one-time preparation, not timed

  train, train_cpu = time_iterator(data.build_train_iterator(cfg, global_batch_size=args.batch, seed=0), args.batches,
                        args.batch)
  ev_it = data.build_eval_iterator(cfg, global_batch_size=args.batch)
  t = time.perf_counter()
  n_eval = sum(int(b["mask"].sum()) for b in ev_it)
  ev = n_eval / (time.perf_counter() - t)
  print(f"cores={cores} tf={tf.__version__} size={args.size} batch={args.batch} augment={args.augment}")
  print(f"train ({args.augment}): {train:8.1f} images/s = {train / cores:7.1f} images/s per core (wall); "
        f"{train_cpu:7.1f} images per CPU-second (per core, independent of other load)")
  print(f"eval (resize+crop, incl. start-up): {ev:8.1f} images/s = {ev / cores:7.1f} images/s per core")


if __name__ == "__main__":
  main()
