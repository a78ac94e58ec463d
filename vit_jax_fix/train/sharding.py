"""Device mesh ('data', 'fsdp') and sharding rules for the train state.

Rules map a leaf's path (``blocks/3/attn/qkv/kernel``; optimizer moments carry the same names inside their
paths) to 'fsdp' or 'replicated'; the first matching regex of ``config.sharding.rules`` wins, otherwise the
strategy decides. 'fsdp' shards the largest axis divisible by the fsdp size (arrays smaller than
``fsdp_min_size`` stay replicated), never the leading block axis of stacked blocks (``block_stacks/...``:
`jax.lax.scan` walks that axis, so each block's slice stays whole across the mesh's fsdp shards of its
other axes). Data parallelism shards only the batch: dimension 0 over both axes.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import NamedSharding

from vit_jax_fix import errors
from vit_jax_fix.models import layout

AXES = ("data", "fsdp")
BATCH_SPEC = jax.P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  n = len(devices) if devices is not None else jax.device_count()
  fsdp = int(fsdp)
  if fsdp < 1 or n % fsdp:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices: set --config.mesh.fsdp to one of "
                     f"{divisors}.")
  data = n // fsdp if data in (-1, None, 0) else int(data)
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices "
                     f"({jax.devices()[0].platform if devices is None else 'given'}): set "
                     f"--config.mesh.data=-1 (use all devices) or --config.mesh.data={n // fsdp} with "
                     f"mesh.fsdp={fsdp}.")
  kw = {} if devices is None else {"devices": devices}
  return jax.make_mesh((data, fsdp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, **kw)


def mesh_from_config(config) -> jax.sharding.Mesh:
  return make_mesh(config.mesh.data, config.mesh.fsdp)


path_str = layout.path_str      # 'a/b/c' of a jax key path (one home: models/layout.py)


def fsdp_spec(shape, fsdp_size: int, min_size: int, *, first_axis: int = 0) -> jax.P:
  """Shard the largest axis (from `first_axis` on) divisible by fsdp_size over 'fsdp'."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return jax.P()
  for axis in sorted(range(first_axis, len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return jax.P(*spec)
  return jax.P()


def partition_specs(tree, *, strategy: str = "replicated", fsdp_size: int = 1, min_size: int = 2 ** 12,
                    rules=()):
  """PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs)."""
  compiled = [(re.compile(p), how) for p, how in rules]
  for _, how in compiled:
    if how not in ("fsdp", "replicated"):
      raise ValueError(f"sharding rule action {how!r}: use 'fsdp' or 'replicated'")

  def spec(path, x):
    shape = tuple(getattr(x, "shape", ()))
    name = path_str(path)
    how = strategy
    for pat, action in compiled:
      if pat.search(name):
        how = action
        break
    if how != "fsdp":
      return jax.P()
    return fsdp_spec(shape, fsdp_size, min_size, first_axis=1 if layout.is_stacked_path(path) else 0)
  return jax.tree.map_with_path(spec, tree)


def state_shardings(tree, mesh, config):
  specs = partition_specs(tree, strategy=config.sharding.strategy, fsdp_size=mesh.shape["fsdp"],
                          min_size=int(config.sharding.fsdp_min_size), rules=tuple(config.sharding.rules))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, jax.P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def global_batch(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch dimension on every device."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize` when the environment asks for it (JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a cluster jax detects itself: SLURM, Open MPI, TPU pods).

  VIT_JAX_FIX_HEARTBEAT_TIMEOUT (seconds, jax's default 100; set the same on every host): a process that
  stops sending heartbeats for that long (killed, its host lost) is declared dead, and every other process
  ends with jax's "another task died" error instead of waiting in a collective forever."""
  import os
  kw = {}
  if os.environ.get("VIT_JAX_FIX_HEARTBEAT_TIMEOUT"):
    try:
      kw["heartbeat_timeout_seconds"] = int(os.environ["VIT_JAX_FIX_HEARTBEAT_TIMEOUT"])
    except ValueError:
      raise errors.UsageError(f"VIT_JAX_FIX_HEARTBEAT_TIMEOUT={os.environ['VIT_JAX_FIX_HEARTBEAT_TIMEOUT']!r}: "
                              "give a whole number of seconds (e.g. 100)") from None
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]), **kw)
    return True
  if any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) and \
      int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
    jax.distributed.initialize(**kw)
    return True
  return False
