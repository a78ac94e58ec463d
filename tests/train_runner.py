"""Runs main.py inside tfds mock_data for imagenet2012 (metadata built here): the e2e trainer test's child.

usage: python tests/train_runner.py DATA_DIR [main.py flags...]
Environment: JAX_NUM_CPU_DEVICES (set by the test), JAX_COMPILATION_CACHE_DIR (optional).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from absl import app  # noqa: E402

import main  # noqa: E402
from vit_jax_fix.data.testing import mock_imagenet  # noqa: E402

if __name__ == "__main__":
  data_dir = sys.argv.pop(1)
  with mock_imagenet(data_dir, train=64, validation=20):
    app.run(main.main)
