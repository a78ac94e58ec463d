"""Train and evaluate a model:  python main.py --config configs/augvit_s.py:demo --workdir /tmp/augvit_demo

Overrides: --config.batch_size=256 --config.optimizer.lr=1e-3, and any model option whether or not the config
file sets it: --config.model.overrides.feat_scale=double --config.model.overrides.dtype=bfloat16 (see
vit_jax_fix/train/cli.py). A mistake a user can fix ends with its message and a non-zero exit (2: usage or
config); VIT_JAX_FIX_DEBUG=1 shows the traceback. Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or run under SLURM / Open MPI) and start the same command on every host.
On a CPU-only install it first restarts itself with huge-page malloc (vit_jax_fix/hostmem.py; faster steps).
"""
import sys

from vit_jax_fix import hostmem

if __name__ == "__main__":
  hostmem.maybe_reexec_with_huge_pages(sys.argv)   # before JAX loads: glibc reads tunables at start-up

from absl import flags, logging  # noqa: E402

from vit_jax_fix import errors  # noqa: E402
from vit_jax_fix.train import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_main_flags(FLAGS)


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments {argv[1:]}: use --config FILE[:ARG] --workdir DIR "
                            "[--config.KEY=VALUE ...]")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  from vit_jax_fix.train import sharding
  sharding.maybe_initialize_distributed()
  from vit_jax_fix.train import train_and_evaluate
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, prog="main.py")
