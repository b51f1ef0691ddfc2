"""Joining a multi-process JAX job: Cloud TPU / GKE auto-detection or explicit flags.

Every worker of a TPU pod slice runs the same `sptlm train` command; JAX finds its peers from
the TPU environment. Elsewhere (CPU tests, GPU clusters) pass the coordinator explicitly, by
flags or by the SPTLM_COORDINATOR / SPTLM_NUM_PROCESSES / SPTLM_PROCESS_ID variables.
"""

import logging
import os

import jax

from sptlm.errors import UserError

log = logging.getLogger(__name__)


def _multihost_tpu() -> bool:
  """GKE sets the worker list in the environment; TPU VMs keep it in instance metadata."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  try:  # jax's own Cloud TPU VM detection (a private module: tolerate its absence)
    from jax._src.clusters import cloud_tpu_cluster
    return cloud_tpu_cluster.GceTpuCluster.is_env_present()
  except Exception:  # noqa: BLE001 - not on a TPU VM, or jax moved the module
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Initialises jax.distributed when the job has several processes; True if it did."""
  coordinator = coordinator or os.environ.get("SPTLM_COORDINATOR") or None
  if num_processes is None and os.environ.get("SPTLM_NUM_PROCESSES"):
    num_processes = int(os.environ["SPTLM_NUM_PROCESSES"])
  if process_id is None and os.environ.get("SPTLM_PROCESS_ID"):
    process_id = int(os.environ["SPTLM_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator needs --num-processes and --process-id (or "
                      "SPTLM_NUM_PROCESSES and SPTLM_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process-id {process_id} must be in [0, {num_processes})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _multihost_tpu():
    jax.distributed.initialize()
  else:
    return False
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
