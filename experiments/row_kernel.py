"""The row kernel against XLA's dot on one trunk step's weight products, for M input rows: the
products a decoding step makes (in every layer q, k and v as one product, o, gate and up as one,
down, as model.kernel_layout stacks them; M = batch x positions), with random float32 weights in
the kernel's layout (one output per row).

Run: python experiments/row_kernel.py                   (SmolLM2-135M's shapes)
     python experiments/row_kernel.py --rows 1,4,32 --layers 8
Prints, per M: ms for the whole chain through each (fastest of --rounds interleaved rounds), the
GFLOP/s and weight GB/s that makes, and each as a multiple of its own time at the first M. Both
paths are checked equal first. The kernel path here ignores kernels.MAX_ROWS, so rows past it
show what the kernel would do there.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_ROWS = flags.DEFINE_list('rows', ['1', '2', '4', '8', '16', '24', '32'], 'Input rows M.')
_WIDTH = flags.DEFINE_integer('width', 576, 'Model width.')
_KV_WIDTH = flags.DEFINE_integer('kv_width', 192, 'Width of k and v (kv heads x head size).')
_FFN = flags.DEFINE_integer('ffn', 1536, 'Feed-forward width.')
_LAYERS = flags.DEFINE_integer('layers', 30, 'Layers.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Interleaved timing rounds; the fastest is kept.')


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax import kernels

  if not kernels.usable():
    sys.exit('error: the row kernel is not available here (see the note above, or '
             'MTP_JAX_KERNELS=0 is set)')
  d, kv, f = _WIDTH.value, _KV_WIDTH.value, _FFN.value
  shapes = [(d + 2 * kv, d), (d, d), (2 * f, d), (d, f)] * _LAYERS.value
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes]
  bytes_read = sum(n * k * 4 for n, k in shapes)

  kernels.MAX_ROWS = 1 << 30  # the kernel path takes every M here

  def chain(use_kernel):
    @jax.jit
    def run(weights, x_d, x_f):
      total = 0.0
      for w in weights:  # each product's output reduced, so none is dead code
        y = kernels.rows_matmul(x_d if w.shape[1] == d else x_f, w, use_kernel)[0, 0]
        total = total + y
        # The next product waits for this one, as a decoding step's do: independent products
        # would run two at a time on XLA's threads, each on one core.
        x_d, x_f, _ = jax.lax.optimization_barrier((x_d, x_f, y))
      return total
    return run

  paths = {'kernel': chain(True), 'xla': chain(False)}
  base = {}
  print(f'{len(shapes)} products, {bytes_read / 1e6:.0f} MB of float32 weights')
  print(f'{"rows":>5} | ' + ' | '.join(f'{p}: ms   GFLOP/s  GB/s  x first' for p in paths))
  for M in [int(r) for r in _ROWS.value]:
    x_d = jnp.asarray(rng.standard_normal((M, d), np.float32))
    x_f = jnp.asarray(rng.standard_normal((M, f), np.float32))
    a, b = (np.asarray(paths[p](weights, x_d, x_f)) for p in paths)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    best = {p: float('inf') for p in paths}
    for _ in range(_ROUNDS.value):
      for p, fn in paths.items():
        start = time.perf_counter()
        fn(weights, x_d, x_f).block_until_ready()
        best[p] = min(best[p], time.perf_counter() - start)
    flop = 2 * M * bytes_read / 4
    cells = []
    for p, t in best.items():
      base.setdefault(p, t)
      cells.append(f'{t * 1e3:8.2f} {flop / t / 1e9:8.1f} {bytes_read / t / 1e9:5.1f} '
                   f'{t / base[p]:6.2f}')
    print(f'{M:>5} | ' + ' | '.join(cells), flush=True)


if __name__ == '__main__':
  app.run(main)
