"""How much of a pretrained trunk the tile kernels take exactly (decode.tiles), in either of their
forms (two halves on the tile unit alone; scaled tiles there or on the FMAs of AVX-512 or
AVX2). Per kind of matrix: the share of entries that are each the sum of two bfloat16 numbers (hi,
its bfloat16 rounding, and lo, that of the rest; kernels.two_bfloat16), the largest relative gap
|hi + lo - w| / |w| of the others, and whether every matrix of the kind has the form of
kernels.ScaledTiles along its input axis (as decoding's params hold it): each run of 32 entries
along a row a float16 scale times integers, of at most 127 in magnitude (`scale`: a GGUF Q8_0
tensor dequantized) or from 0 to 15 plus a float16 offset (`affine`: Q4_1's). model.tile_trunk
stores a block's matrix as ScaledTiles where it has that form (half a byte an entry for
Q4_1's integers, 1 for Q8_0's), else in two halves where all of its entries split so (4
bytes). Then whether the output matrix (the embedding, when tied) is in ScaledTiles' form,
which model.tile_trunk then adds for the projection onto the vocabulary.

Run: python experiments/tile_split.py --config configs/smollm2.py
Prints one row per kind (the embedding, each block's q, k, v, o, gate, up and down over every
block): matrices, entries, the share that splits, whether every matrix of that kind splits
entirely, the largest gap, the ScaledTiles form of all of them (scale, affine, or no; mixed where
the matrices of the kind differ); then one line for the output matrix.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

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


def kernel_rows(path, w):
  """The stored matrix w as decoding's params hold it (model.kernel_layout): one output per row,
  its input axes flattened last; the embedding as it is (V x D)."""
  from mtp_jax.model import matrix_rows, outputs_first
  rows = matrix_rows(path, outputs_first(path, w))
  return w if rows is None else rows


def scaled_form(w) -> str:
  """'affine' or 'scale' where the matrix w (N, K) is in kernels.ScaledTiles' form, else 'no'."""
  from mtp_jax import kernels
  t = kernels.scaled_tiles_if_exact(w)
  return 'no' if t is None else 'affine' if t.affine else 'scale'


def main(argv):
  cli.start(argv, persist=False)
  import jax
  from mtp_jax.config import ConfigError
  from mtp_jax.pretrained import resolve
  config = _CONFIG.value
  if not config.model.init_from:
    cli.fail('the config has no pretrained trunk (model.init_from)')
  try:
    trunk = resolve.trunk_params(config.model.init_from)
  except (ConfigError, ValueError) as e:
    cli.fail(e)
  from mtp_jax import kernels
  # matrices, entries, split, gap, ScaledTiles forms
  kinds = collections.defaultdict(lambda: [0, 0, 0, 0.0, set()])
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
    row[4].add(scaled_form(kernel_rows(path, w)))
  print(f'{os.path.basename(config.model.init_from)}: entries that are two bfloat16 numbers; '
        'the form of kernels.ScaledTiles')
  print(f"{'matrix':10} {'count':>5} {'entries':>11} {'split':>9} {'all':>5} {'largest gap':>11} "
        f"{'scaled':>7}")
  for kind, (count, entries, split, gap, forms) in kinds.items():  # all: every matrix splits
    form = forms.pop() if len(forms) == 1 else 'mixed'
    print(f'{kind:10} {count:>5} {entries:>11} {split / entries:>9.5f} {str(split == entries):>5} '
          f'{gap:>11.2g} {form:>7}')
  from mtp_jax.model import output_matrix
  scaled = kernels.scaled_tiles_if_exact(output_matrix(trunk, kernel_layout_=False)) is not None
  print(f'output matrix as scaled tiles (kernels.ScaledTiles): {scaled}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
