"""Test configuration: 8 simulated CPU devices, set before any JAX computation."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Keep TensorFlow (used only by the input pipeline) off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.is_dir():
    pytest.fail(f"../shared not found at {SHARED}: CI clones the repository beside it.")
  return SHARED
