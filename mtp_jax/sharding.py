"""The device mesh and the one table that maps logical axis names to mesh axes.

Layers name their parameter and activation axes; only this module says where they live.
"""

import contextlib
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax import costs
from mtp_jax.config import ConfigError, ModelConfig

MESH_AXES = ('data', 'fsdp', 'tensor')

# FSDP shards the width, tensor parallelism the heads, MLP width and vocabulary; the batch is
# split over both data-like axes.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('concat_embed', None),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('norm', None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh: sizes must be >= 1 with at most one -1, got {tuple(sizes)}')
  if num_devices % fixed:
    raise ConfigError(f'mesh: data*fsdp*tensor = {fixed} does not divide the {num_devices} devices')
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f'mesh: {tuple(sizes)} uses {int(np.prod(sizes))} devices, '
                      f'but there are {num_devices}')
  return tuple(sizes)


def devices_memory() -> int | None:
  """Bytes of memory of every device together: each accelerator's own (memory_stats'
  bytes_limit), or, for CPU devices, which share their host's memory, that memory once per
  process; None where a device does not say."""
  local = jax.local_devices()
  try:
    if all(d.platform == 'cpu' for d in local):
      per_process = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    else:
      limits = [(d.memory_stats() or {}).get('bytes_limit') for d in local]
      if not all(limits):
        return None
      per_process = sum(limits)
  except (ValueError, OSError, AttributeError):  # no sysconf name here
    return None
  return per_process * jax.process_count()


def check_memory(config, batch: bool = True, available: int | None = None) -> None:
  """Raises ConfigError when the model's weights in float32 (and, with `batch`, a training
  batch of token windows) are more than the memory of all devices together (`available`; by
  default devices_memory()): less than any run needs, so a size typed wrong (model.d_model=2**30)
  is one line before anything is made, not an out-of-memory error after the data."""
  cfg, t = ModelConfig.from_config(config), config.train
  params = costs.param_counts(cfg)['total']
  need, what = 4 * params, f'{params:,} parameters'
  if batch:  # int32 token windows of train.seq_len + mtp.depth + 1
    need += 4 * t.batch_size * (t.seq_len + cfg.mtp_depth + 1)
    what += f' and a batch of train.batch_size={t.batch_size} token windows'
  fields = 'model.* and mtp.*' + (' and train.batch_size' if batch else '')
  check_bytes(need, 'the model needs', f'{what}, in float32', f'the sizes in {fields}', available)


def check_bytes(need: int, who: str, what: str, fields: str, available: int | None = None) -> None:
  """Raises ConfigError when `need` bytes (what `who` needs at least: `what`) are more than the
  memory of all devices together (`available`; by default devices_memory()), naming the flags or
  fields that set them."""
  available = devices_memory() if available is None else available
  if available is not None and need > available:
    raise ConfigError(f'{who} at least {need / 2**30:,.1f} GiB ({what}), more than the '
                      f'{available / 2**30:,.1f} GiB of memory of its devices; check {fields}')


def check_mesh(config, num_devices: int, num_processes: int = 1, batch: bool = True) -> None:
  """Raises ConfigError naming the field when a mesh axis does not divide a dimension that RULES
  shard over it (jit rejects uneven shardings with an error that names an array, not a field),
  or when processes would have to share batch rows. `batch=False` leaves out the training
  batch, for modes that only decode (they lay out their prompts for any count)."""
  cfg, t = ModelConfig.from_config(config), config.train
  sizes = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  mlp = 'model.mlp_dim' + (' (0: 8/3 * d_model)' if config.model.mlp_dim == 0 else '')
  fields = {'batch': [('train.batch_size / train.grad_accum', t.batch_size // t.grad_accum)]
                     if batch else [],
            'embed': [('model.d_model', cfg.d_model)], 'heads': [('model.num_heads', cfg.num_heads)],
            'kv_heads': [('model.num_kv_heads', cfg.num_kv_heads)], 'mlp': [(mlp, cfg.mlp_dim)],
            'vocab': [('data.vocab_size', cfg.vocab_size)]}
  if cfg.head_mlp_dim and cfg.mtp_depth:
    fields['mlp'].append(('mtp.head_mlp_dim', cfg.head_mlp_dim))
  elif cfg.mtp_kind == 'medusa' and cfg.mtp_depth:  # its single D x D layer shards D as 'mlp'
    fields['mlp'].append(('model.d_model (medusa heads)', cfg.d_model))
  for name, axes in RULES:
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    parts = int(np.prod([sizes[a] for a in axes]))
    for field, size in fields[name]:
      if size % parts:
        mesh = ' * '.join(f'mesh.{a}' for a in axes)
        raise ConfigError(f'{field} = {size} is not divisible by {mesh} = {parts}, the mesh '
                          f'axes that shard it')
  # Each process feeds only its own rows (data.get_batch), so every process must hold distinct
  # batch shards: the batch axes must split across processes, not the tensor axis alone.
  if (sizes['data'] * sizes['fsdp']) % num_processes:
    raise ConfigError(f"mesh.data * mesh.fsdp = {sizes['data'] * sizes['fsdp']} must be a "
                      f'multiple of the {num_processes} processes, which each read their own '
                      f'rows of the batch')


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(specs, mesh: Mesh):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


@contextlib.contextmanager
def active(mesh: Mesh):
  """The mesh and the logical-axis table, in force while tracing and running: jax.set_mesh makes
  it the abstract mesh that nn.with_logical_constraint reads (`with mesh:` alone does not, so
  the activation constraints would silently do nothing)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
