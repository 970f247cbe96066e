"""What a training product costs in each dtype and arrangement: y = x @ w with both gradients
(dx = g @ w.T, dw = x.T @ g), the three products of every dense layer in a training step, timed
  - in float32, as plain `x @ w` (the backend's default precision) and through mtp_jax.matmul
    (what the model runs: HIGHEST precision, which a GPU would otherwise round to TF32);
  - in bfloat16 as XLA gets it from plain `x @ w` (its CPU backend widens operands to float32
    for a bfloat16 result or a transposed operand);
  - in bfloat16 through mtp_jax.matmul (row-major operands, float32 results; what train.dtype =
    bfloat16 runs).

Run: python experiments/bench_matmul.py                 (the SmolLM2 head step's shapes)
     python experiments/bench_matmul.py --shapes 2048x576x1536 --rounds 5
Prints, per shape M x K x N (x: M x K, w: K x N): ms for the product and its two gradients, the
GFLOP/s that makes (6 M K N FLOPs), and each row's speed over float32's, all timed in interleaved
rounds (fastest kept). Whether bfloat16 beats float32 depends on the device: on a CPU with AMX
the arranged products run several times faster, elsewhere bfloat16 can be slower
(mtp_jax.measure.bfloat16_products_fast says which this is).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

# A head step on SmolLM2 (16 x 128 positions): q and o, k and v, gate and up, down, the first
# module's eh_proj (4 + 1 slices of 576), the 8192-token draft projection.
_SHAPES = flags.DEFINE_list('shapes', ['2048x576x576', '2048x576x192', '2048x576x1536',
                                       '2048x1536x576', '2048x2880x576', '2048x576x8192'],
                            'Products M x K x N.')
_ROUNDS = cli.rounds_flag(5)


def parse_shape(text: str) -> tuple[int, int, int]:
  parts = text.lower().split('x')
  if len(parts) != 3 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
    cli.fail(f'--shapes takes M x K x N in positive integers, like 64x32x48; got {text!r}')
  return tuple(int(p) for p in parts)


def main(argv):
  cli.start(argv, persist=False)
  shapes = [parse_shape(s) for s in _SHAPES.value]
  if not shapes:
    cli.fail('--shapes: give at least one M x K x N, like 64x32x48')
  import jax
  import jax.numpy as jnp
  from mtp_jax import measure
  from mtp_jax.matmul import matmul
  M, K, N = max(shapes, key=lambda s: s[0] * s[1] + s[1] * s[2] + s[0] * s[2])
  cli.check_bytes(4 * (M * K + K * N + M * N), f'the product {M}x{K}x{N} needs',
                  'its operands in float32', '--shapes')

  def step(product):
    """The product and both gradients, as a training step's backward pass makes them."""
    def f(x, w, g):
      y, pullback = jax.vjp(product, x, w)
      return y, *pullback(g.astype(y.dtype))
    return jax.jit(f)

  ways = {'float32': (jnp.float32, step(lambda x, w: x @ w)),
          'float32, mtp_jax.matmul': (jnp.float32, step(matmul)),
          'bfloat16, plain x @ w': (jnp.bfloat16, step(lambda x, w: x @ w)),
          'bfloat16, mtp_jax.matmul': (jnp.bfloat16, step(matmul))}
  print(f'{measure.machine(measure.machine_info())}; bfloat16 products fast here: '
        f'{measure.bfloat16_products_fast()}')
  print(f'{"M x K x N":>16} | {"way":26} | {"ms":>8} | {"GFLOP/s":>8} | x float32')
  for M, K, N in shapes:
    keys = jax.random.split(jax.random.key(M * K + N), 3)
    operands = [jax.random.normal(k, s) for k, s in zip(keys, [(M, K), (K, N), (M, N)])]
    calls = []
    for dtype, fn in ways.values():
      args = [a.astype(dtype) for a in operands]
      calls.append(lambda fn=fn, args=args: fn(*args))
    best, _ = measure.fastest(calls, _ROUNDS.value, warmup=True)
    for (name, _), seconds in zip(ways.items(), best):
      print(f'{f"{M}x{K}x{N}":>16} | {name:26} | {seconds * 1e3:8.2f} | '
            f'{6 * M * K * N / seconds / 1e9:8.0f} | {best[0] / seconds:8.2f}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
