"""Tiny in-process training runs on a generated image folder, shared by the trainer tests."""
import json
import os

from vit_jax_fix.data import testing as data_testing
from vit_jax_fix.train import config as C


def make_folder(base):
  """3 classes x 8 images of 20x20 px under base/imgs; returns (image root, tfds data_dir)."""
  root = str(base / "imgs")
  data_testing.make_image_folder(root, num_classes=3, per_class=8, size=(20, 20))
  return root, str(base / "tfds")


def set_keys(c, **keys):
  """c['a.b.c'] = v for dotted keys (as --config.a.b.c=v on the command line)."""
  for k, v in keys.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def folder_config(folder, *, model: str, overrides: dict, **keys):
  """Base config training `model` at 16 px on the folder (evaluated on its train split), batch 8, plain
  augmentation, no mixing, no progress bar; `keys` (dotted) change anything else."""
  root, data_dir = folder
  c = C.base_config()
  c.model.name = model
  c.model.overrides = dict(overrides)
  d = c.data
  d.dataset, d.folder, d.data_dir, d.eval_split = "folder", root, data_dir, "train"
  d.image_size, d.augment, d.rand_augment, d.reprob, d.hflip = 16, "none", "", 0.0, 0.0
  d.mixup, d.cutmix, d.repeated_aug, d.shuffle_buffer = 0.0, 0.0, 1, 32
  c.batch_size = c.eval_batch_size = 8
  c.optimizer.lr_batch_scale = 0
  c.eval_every_steps = 0
  c.progress_bar = False
  return set_keys(c, **keys)


def logged_step(workdir) -> int:
  """The last step a (running or killed) run wrote to its metrics.jsonl; 0 before the first row."""
  try:
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in lines:
    try:
      steps.append(json.loads(line)["step"])
    except (ValueError, KeyError):
      pass                                                   # a line being written, or torn by a kill
  return max(steps)
