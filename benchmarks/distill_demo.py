"""Demo-scale DeiT distillation on the embedded MNIST-5k: a teacher trained with configs/deit_s.py:demo, then a
smaller distilled student (configs/deit_s_distilled.py:demo, hard distillation, alpha 0.5) whose teacher is
that run's checkpoint; reports how often the student's eval prediction (its two heads averaged) agrees with
the teacher's, and both top-1.

    python benchmarks/distill_demo.py --out /tmp/distill_demo      # both runs, then the agreement
    python benchmarks/distill_demo.py --out /tmp/d --epochs 2 --student-depth 1   # smoke run

Writes <out>/distill_demo.json (and the two workdirs under <out>); the committed result is
benchmarks/results/distill_demo.json / .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def agreement(student_dir: str, teacher_dir: str, config) -> dict:
  """Eval-split agreement of the arg-max predictions of two trainer checkpoints (eval mode: a distilled
  student averages its heads), and each one's top-1."""
  import jax
  import numpy as np
  from flax import nnx
  from vit_jax_fix.train import checkpoint, loop
  models = {"student": checkpoint.load_model(student_dir), "teacher": checkpoint.load_model(teacher_dir)}
  forward = nnx.jit(lambda m, x: m(x))
  setup = loop.Setup(config)
  agree = n = 0
  hits = {"student": 0, "teacher": 0}
  for batch in setup.eval_batches():
    mask = np.asarray(batch["mask"]) > 0
    pred = {k: np.asarray(jax.numpy.argmax(forward(m, jax.numpy.asarray(batch["image"])), -1))[mask]
            for k, m in models.items()}
    labels = np.asarray(batch["label"])[mask]
    agree += int(np.sum(pred["student"] == pred["teacher"]))
    for k in hits:
      hits[k] += int(np.sum(pred[k] == labels))
    n += int(mask.sum())
  return {"eval_images": n, "agreement": agree / n, "student_top1": hits["student"] / n,
          "teacher_top1": hits["teacher"] / n}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--epochs", type=float, default=15.0, help="epochs of each run (the demos' default)")
  p.add_argument("--student-depth", type=int, default=3, help="the student's depth (teacher: the demo's 6)")
  p.add_argument("--data-dir", default="", help="where the demo set is prepared (default: the data config's)")
  p.add_argument("--distillation", default="hard", choices=("hard", "soft", "none"),
                 help="'none': the same student trained on the labels alone (the baseline agreement)")
  p.add_argument("--teacher-dir", default="", help="reuse this trained teacher workdir instead of training one")
  a = p.parse_args(argv)
  from configs import common, deit_s, deit_s_distilled
  from vit_jax_fix.train import loop
  os.makedirs(a.out, exist_ok=True)
  teacher_dir, student_dir = a.teacher_dir or os.path.join(a.out, "teacher"), os.path.join(a.out, "student")
  result = {"epochs": a.epochs, "teacher": dict(common.DEMO_MODEL), "student_depth": a.student_depth,
            "distillation": a.distillation}

  c = deit_s.get_config("demo")
  c.num_epochs, c.progress_bar = a.epochs, False
  if a.data_dir:
    c.data.data_dir = a.data_dir
  if not a.teacher_dir:
    t0 = time.time()
    result["teacher_final"] = loop.train_and_evaluate(c, teacher_dir)
    result["teacher_seconds"] = round(time.time() - t0)

  s = deit_s_distilled.get_config("demo")
  s.num_epochs, s.progress_bar = a.epochs, False
  s.model.overrides.depth = a.student_depth
  if a.data_dir:
    s.data.data_dir = a.data_dir
  d = s.distillation
  d.type = a.distillation
  d.teacher, d.teacher_overrides, d.teacher_weights = "deit_small_patch16_224", dict(common.DEMO_MODEL), teacher_dir
  t0 = time.time()
  result["student_final"] = loop.train_and_evaluate(s, student_dir)
  result["student_seconds"] = round(time.time() - t0)
  result.update(agreement(student_dir, teacher_dir, s))
  with open(os.path.join(a.out, "distill_demo.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
  main()
