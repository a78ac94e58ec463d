"""Train and evaluate a model:  python main.py --config configs/augvit_s.py:demo --workdir /tmp/augvit_demo

Overrides: --config.batch_size=256 --config.optimizer.lr=1e-3 ...  Multi-host: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM / Open MPI) and start the same command on every host.
On a CPU-only install it first restarts itself with huge-page malloc (vit_jax_fix/hostmem.py; faster steps).
"""
import sys

from vit_jax_fix import hostmem

if __name__ == "__main__":
  hostmem.maybe_reexec_with_huge_pages(sys.argv)   # before JAX loads: glibc reads tunables at start-up

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the saved config go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  from vit_jax_fix.train import sharding
  sharding.maybe_initialize_distributed()
  from vit_jax_fix.train import train_and_evaluate
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
