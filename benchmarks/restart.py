"""Restart-to-first-batch time of the train iterator at 5% and 95% of an epoch (issue #21, part 3).

Writes a 100k-example tfds dataset of small JPEGs (1,000 distinct 32 x 32 images, ~1 kB each, cycled with
random labels) once into a temp dir, prepared by tfds in both file formats, and reads it through the trainer's
real path (``dataset='from_data_dir'``). For each case it times ``next(build_train_iterator(...,
start_step=s))``, from the call to the first batch (batch 256 per host, DeiT augmentation at 32 px, defaults
otherwise: repeated augmentation 3, shuffle buffer 10,000), s at 0%, 5% and 95% of the epoch:

* ``1 host``: one process reading the whole train split;
* ``host 1/2 global RA``: process 1 of 2 with DeiT's global repeated augmentation, where every host used to
  read the whole split.

Each configuration is timed ``--repeats`` times, interleaved, and the median reported. The code under test is
what ``import vit_jax_fix`` finds: run it once on the old code (``PYTHONPATH=<checkout of the old commit>``,
``--label before``, tfrecord only: the old code cannot read array_record) and once on the current one
(``--label after``); the rows of both land in ``benchmarks/results/restart.json`` (merged by label) and
``restart.md``.

  python benchmarks/restart.py --label after [--examples 100000] [--repeats 3] [--workdir /tmp/restart_ds]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("PYTHONPATH"):
  sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import machine  # noqa: E402

FRACTIONS = (0.0, 0.05, 0.95)
BATCH = 256
CASES = {"1 host": dict(process_index=0, process_count=1), "host 1/2 global RA": dict(process_index=1,
                                                                                        process_count=2)}


def make_builder_class(examples: int):
  import tensorflow_datasets as tfds

  class RestartBench(tfds.core.GeneratorBasedBuilder):
    """`examples` small JPEGs with random labels (1,000 distinct images cycled)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=100)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      from PIL import Image
      rng = np.random.RandomState(0)
      images = []
      for _ in range(1000):
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
      labels = rng.randint(0, 100, examples)
      for i in range(examples):
        yield i, {"image": images[i % len(images)], "label": int(labels[i])}
  return RestartBench


def prepare(workdir: str, examples: int) -> dict:
  """{format: prepared dataset directory}, built once per (workdir, examples)."""
  import tensorflow_datasets as tfds
  cls = make_builder_class(examples)
  out = {}
  for fmt in ("tfrecord", "array_record"):
    data_dir = os.path.join(workdir, f"{examples}_{fmt}")
    builder = cls(data_dir=data_dir, file_format=fmt)
    if not builder.is_prepared():
      t = time.perf_counter()
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      print(f"prepared {fmt} in {time.perf_counter() - t:.0f} s: {builder.data_dir}", flush=True)
    out[fmt] = builder.data_dir
  return out


def time_first_batch(data_dir: str, start_step: int, case: dict) -> float:
  from vit_jax_fix import data
  cfg = data.default_data_config()
  cfg.dataset = "from_data_dir"
  cfg.data_dir = data_dir
  cfg.image_size = 32
  t = time.perf_counter()
  it = data.build_train_iterator(cfg, global_batch_size=BATCH * case["process_count"], seed=0,
                                 start_step=start_step, **case)
  b = next(it)
  dt = time.perf_counter() - t
  assert b["image"].shape == (BATCH, 32, 32, 3)
  return dt


def write_results(rows: list, path_json: str, path_md: str, header: str):
  old = json.load(open(path_json)) if os.path.exists(path_json) else {"rows": []}
  labels = {r["label"] for r in rows}
  merged = [r for r in old["rows"] if r["label"] not in labels] + rows
  with open(path_json, "w") as f:
    json.dump({"header": header, "rows": merged}, f, indent=1)
  lines = [f"# Train-iterator restart: call to first batch\n\n{header}\n",
           "| code | format | case | start | 0% | 5% | 95% | 95% / 5% |", "|---|---|---|---|---:|---:|---:|---:|"]
  keyed = {}
  for r in merged:
    keyed.setdefault((r["label"], r["format"], r["case"]), {})[r["fraction"]] = r
  for (label, fmt, case), by_frac in sorted(keyed.items(), key=lambda kv: (kv[0][0] != "before", kv[0])):
    s = {f: by_frac[f]["median_s"] for f in by_frac}
    ratio = f"{s[0.95] / s[0.05]:.2f}" if 0.05 in s and 0.95 in s else "-"
    lines.append(f"| {label} | {fmt} | {case} | step {by_frac.get(0.95, by_frac[min(by_frac)])['start_step']} "
                 f"(95%) | " + " | ".join(f"{s[f]:.2f} s" if f in s else "-" for f in FRACTIONS) + f" | {ratio} |")
  with open(path_md, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--label", required=True, help="'before' (old code on PYTHONPATH) or 'after'")
  p.add_argument("--examples", type=int, default=100_000)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--formats", default=None, help="comma list; default: both ('before': tfrecord)")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vit_jax_fix_restart_bench"))
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()

  import vit_jax_fix
  from vit_jax_fix import data
  print("code under test:", os.path.dirname(vit_jax_fix.__file__), flush=True)
  dirs = prepare(args.workdir, args.examples)
  formats = args.formats.split(",") if args.formats else (["tfrecord"] if args.label == "before" else
                                                          ["tfrecord", "array_record"])
  plan = []
  for case_name, case in CASES.items():
    length = data.epoch_length(args.examples, 3, process_count=case["process_count"],
                               scope="global" if case["process_count"] > 1 else "host")
    for fmt in formats:
      for frac in FRACTIONS:
        plan.append((fmt, case_name, frac, int(frac * length) // BATCH))
  times = {k: [] for k in plan}
  for rep in range(args.repeats):  # interleaved: machine load drifts between configurations, not within one
    for k in plan:
      times[k].append(time_first_batch(dirs[k[0]], k[3], CASES[k[1]]))
      print(rep, k, f"{times[k][-1]:.2f} s", flush=True)
  rows = [dict(label=args.label, format=k[0], case=k[1], fraction=k[2], start_step=k[3],
               times_s=[round(t, 3) for t in times[k]], median_s=round(statistics.median(times[k]), 3)) for k in plan]
  header = (f"{args.examples:,} examples (32 px JPEGs, ~1 kB records), batch {BATCH} per host, DeiT augmentation, "
            f"repeated_aug 3, median of {args.repeats} interleaved runs; CPU: {machine.cpu_name()}, "
            f"{os.cpu_count()} cores (shared machine). 'start' is the resume step at 95% of the epoch.")
  os.makedirs(args.out, exist_ok=True)
  write_results(rows, os.path.join(args.out, "restart.json"), os.path.join(args.out, "restart.md"), header)
  print(open(os.path.join(args.out, "restart.md")).read())


if __name__ == "__main__":
  main()
