"""One function per launch mode, so launch.py stays a thin flag parser."""

import os

import jax

from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import train as train_lib
from mtp_jax.config import ConfigError

# Errors that mean "the user's input is wrong": printed as one line, exit code 2.
USER_ERRORS = (ConfigError, data_lib.DataError, ckpt_lib.CheckpointError,
               train_lib.TrainingError)


def init_distributed(dist_cfg) -> None:
  """jax.distributed from the config, or from the environment JAX understands."""
  address = dist_cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if address and dist_cfg.num_processes > 1:
    jax.distributed.initialize(address, num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id)


def run(mode: str, config, workdir: str):
  init_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  if mode == 'train':
    summary = train_lib.train(config, workdir)
    if jax.process_index() == 0:
      train_lib.write_summary(workdir, summary)
    return summary
  if mode == 'eval':
    return train_lib.evaluate(config, workdir)
  raise ConfigError(f'unknown mode {mode}')
