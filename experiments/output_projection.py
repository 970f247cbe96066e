"""The projection onto the vocabulary, on a pretrained trunk's own output matrix (the embedding,
when tied), for M input rows: the float32 row kernel, the scaled tiles that model.tile_trunk
makes of a Q8_0 matrix (kernels.ScaledTiles: 1 byte an entry and a scale per 32, on the CPU's
tile unit or else the FMAs of AVX-512 or AVX2; where the matrix has that form and they run) and
XLA's dot.

Run: python experiments/output_projection.py --config configs/smollm2.py [--rows 1,8,32]
Prints, per M: ms for one product through each (fastest of --rounds interleaved rounds, after a
warm-up), the GB/s of the bytes each reads, and its time as a multiple of the float32 kernel's.
Every path's output is checked against XLA's float32 dot first.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import cli  # noqa: E402
from mtp_jax.config import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py', 'Path to a config file.',
                                          lock_config=True)
_ROWS = flags.DEFINE_list('rows', ['1', '2', '4', '8', '16', '32'], 'Input rows M.')
_ROUNDS = cli.rounds_flag(20)


def main(argv):
  cli.start(argv, persist=False)
  rows = cli.positive_ints(_ROWS.value, '--rows')
  config = _CONFIG.value
  if not config.model.init_from:
    cli.fail('the config has no pretrained trunk (model.init_from)')
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax import kernels, measure, sharding
  from mtp_jax.model import output_matrix
  from mtp_jax.pretrained import resolve

  if not kernels.usable():
    cli.fail('the row kernel is not available here (MTP_JAX_KERNELS=0, or no compiler)')
  try:
    fields = resolve.resolve_config(config)  # the file's header, before its weights
    V, D = fields.data.vocab_size, fields.model.d_model
    sharding.check_bytes(4 * max(rows) * (D + 2 * V), f'{max(rows):,} rows need',
                         'their inputs and two products in float32', '--rows')
    trunk = resolve.trunk_params(config.model.init_from)
  except (ConfigError, ValueError) as e:
    cli.fail(e)
  w = jnp.asarray(output_matrix(trunk, kernel_layout_=False), jnp.float32)  # one output a row
  scaled = kernels.scaled_tiles_if_exact(w)
  operands = {'float32 kernel': w, 'xla': w}
  if scaled is None:
    form = 'not in the form of scaled tiles'
  elif not kernels.scaled_usable():
    form = 'in the form of scaled tiles, but no scaled-tile kernel here'
  else:
    form = 'scaled tiles'
    operands = {'float32 kernel': w, 'scaled tiles': scaled, 'xla': w}
  reads = {'float32 kernel': w.nbytes, 'xla': w.nbytes,
           'scaled tiles': 0 if scaled is None else scaled.q.nbytes + scaled.scales.nbytes}
  print(f'{os.path.basename(config.model.init_from)}: output matrix {V} x {D}; {form}')
  kernels.MAX_ROWS = kernels.MAX_UNROLLED_ROWS = 1 << 30  # the kernel path takes every M at once
  product = jax.jit(kernels.rows_matmul, static_argnums=2)
  print(f'{"rows":>5} | ' + ' | '.join(f'{p}: ms   GB/s  x float32' for p in operands))
  rng = np.random.default_rng(0)
  for M in rows:
    x = jnp.asarray(rng.standard_normal((M, D), np.float32))
    want = np.asarray(product(x, w, False))
    for path, operand in operands.items():
      got = np.asarray(product(x, operand, path != 'xla'))
      if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        print(f"error: the {path} path's {M}-row product differs from XLA's dot by up to "
              f'{np.abs(got - want).max():.3g}', file=sys.stderr)
        sys.exit(1)
    seconds, _ = measure.fastest(
        [lambda o=o, p=p: product(x, o, p != 'xla') for p, o in operands.items()],
        _ROUNDS.value, warmup=True)
    first = seconds[0]
    print(f'{M:>5} | ' + ' | '.join(f'{t * 1e3:8.2f} {reads[p] / t / 1e9:6.1f} {t / first:9.2f}'
                                    for p, t in zip(operands, seconds)), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
