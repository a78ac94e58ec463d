"""Test configuration: 8 simulated CPU devices, set before any JAX computation."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Keep TensorFlow (used only by the input pipeline) off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
  """The embedded demo set, prepared once for the whole session: every xdist worker and notebook kernel uses
  this one folder (a file lock keeps them from preparing it concurrently) and the user's ~/.cache is left
  alone."""
  import fcntl
  root = tmp_path_factory.getbasetemp().parent / "vit_jax_fix_notebook_data"
  root.mkdir(exist_ok=True)
  with open(root / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    from vit_jax_fix import data as vdata
    cfg = vdata.default_data_config()
    cfg.dataset, cfg.data_dir = "demo", str(root)
    vdata.dataset_info(cfg)  # prepares it when missing
  return root
