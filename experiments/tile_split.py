"""How much of a pretrained trunk the tile unit takes exactly (decode.tiles): per kind of matrix,
the share of entries that are each the sum of two bfloat16 numbers (hi, its bfloat16 rounding,
and lo, that of the rest; kernels.two_bfloat16), and the largest relative gap |hi + lo - w| / |w|
of the others. model.tile_trunk tiles a matrix only when all of its entries split so. Then
whether the output matrix (the embedding, when tied) has the form of kernels.ScaledTiles, which
model.tile_trunk then adds for the projection onto the vocabulary: each run of 32 entries along
a row one scale times integers of at most 127, as a GGUF Q8_0 tensor dequantizes.

Run: python experiments/tile_split.py --config configs/smollm2.py
Prints one row per kind (the embedding, each block's q, k, v, o, gate, up and down over every
block): matrices, entries, the share that splits, whether every matrix of that kind splits
entirely, the largest gap; then one line for the output matrix.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py', 'Path to a config file.',
                                          lock_config=True)


def split_counts(w) -> tuple[int, float]:
  """(entries of the float32 array w that are exactly hi + lo, its kernels.halves, the largest
  relative gap)."""
  import jax.numpy as jnp
  from mtp_jax import kernels
  w = jnp.asarray(w, jnp.float32)
  two = sum(h.astype(jnp.float32) for h in kernels.halves(w))
  gap = jnp.abs(two - w) / jnp.maximum(jnp.abs(w), jnp.finfo(jnp.float32).tiny)
  return int(jnp.sum(two == w)), float(jnp.max(gap, initial=0.0))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  import jax
  from mtp_jax.config import ConfigError
  from mtp_jax.pretrained import resolve
  config = _CONFIG.value
  if not config.model.init_from:
    print('error: the config has no pretrained trunk (model.init_from)', file=sys.stderr)
    sys.exit(2)
  try:
    trunk = resolve.trunk_params(config.model.init_from)
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  kinds = collections.defaultdict(lambda: [0, 0, 0, 0.0])  # matrices, entries, split, gap
  for path, w in jax.tree_util.tree_leaves_with_path(trunk):
    if w.ndim < 2:  # norms
      continue
    kind = str(getattr(path[-1], 'key', path[-1]))
    split, gap = split_counts(w)
    row = kinds[kind]
    row[0] += 1
    row[1] += w.size
    row[2] += split
    row[3] = max(row[3], gap)
  print(f'{os.path.basename(config.model.init_from)}: entries that are two bfloat16 numbers')
  print(f"{'matrix':10} {'count':>5} {'entries':>11} {'split':>9} {'all':>5} {'largest gap':>11}")
  for kind, (count, entries, split, gap) in kinds.items():  # all: every matrix splits entirely
    print(f'{kind:10} {count:>5} {entries:>11} {split / entries:>9.5f} {str(split == entries):>5} '
          f'{gap:>11.2g}')
  from mtp_jax import kernels
  from mtp_jax.model import output_matrix
  scaled = kernels.scaled_tiles_if_exact(output_matrix(trunk, kernel_layout_=False)) is not None
  print(f'output matrix as scaled tiles (kernels.ScaledTiles): {scaled}')


if __name__ == '__main__':
  app.run(main)
