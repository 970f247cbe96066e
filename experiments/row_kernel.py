"""The row kernel against XLA's dot on one trunk step's weight products, for M input rows: the
products a decoding step makes (in every layer q, k and v as one product, o, gate and up as one,
down, as model.kernel_layout stacks them; M = batch x positions), with random float32 weights in
the kernel's layout (one output per row) in the form of a GGUF Q4_1 tensor dequantized (each run
of 32 entries along a row a float16 scale times integers 0 to 15 plus a float16 offset), whose
entries are also each the sum of two bfloat16 numbers; where the shapes are whole tiles, also
the products of the same weights as decoding keeps them there (decode.tiles): `scaled`, as
kernels.ScaledTiles (the integers two to a byte, a float16 scale and offset a run of 32), where
they run (kernels.scaled_usable: on the tile unit, AMX, else on the FMAs of AVX-512 or AVX2),
and `tiled`, in two bfloat16 halves (kernels.tiled, 4 bytes an entry), where the CPU has AMX
(kernels.tiles_usable).

Run: python experiments/row_kernel.py                   (SmolLM2-135M's shapes)
     python experiments/row_kernel.py --rows 1,4,32 --layers 8
     git show HEAD~1:mtp_jax/kernels/decode_ops.cc > /tmp/old.cc
     python experiments/row_kernel.py --baseline /tmp/old.cc   (another version of the kernel)
     python experiments/row_kernel.py --cached                  (arithmetic alone)
     python experiments/row_kernel.py --cached --decompose      (what a scaled run's parts cost)
Prints, per M: ms for the whole chain through each (fastest of --rounds interleaved rounds), the
GFLOP/s and weight GB/s (the bytes each path reads) that makes, and each as a multiple of its
own time at the first M. Every output of each product shape is checked against XLA's dot first,
and each chain runs once untimed. The kernel path here takes every M in one call, so rows past
kernels.MAX_ROWS show what one call would do there. A --baseline kernel is built here and timed in the same
rounds (its tiled and Q4_1 scaled products too, where it has them and the tiles run): this VM's
memory is faster in some minutes than in others, so two versions compare only within one run.
--decompose adds the scaled products with parts of each 32-entry run's work left out (`no
scaling`: the tile's sums stored but not scaled and added; `products only`: not stored either;
their outputs all zeros), timed in the same rounds and checked only to differ from XLA's: the
columns' differences are what storing and scaling cost at each M.
"""

import ctypes
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_ROWS = flags.DEFINE_list('rows', ['1', '2', '4', '8', '16', '24', '32'], 'Input rows M.')
_WIDTH = flags.DEFINE_integer('width', 576, 'Model width.', lower_bound=1)
_KV_WIDTH = flags.DEFINE_integer('kv_width', 192, 'Width of k and v (kv heads x head size).',
                                 lower_bound=1)
_FFN = flags.DEFINE_integer('ffn', 1536, 'Feed-forward width.', lower_bound=1)
_LAYERS = flags.DEFINE_integer('layers', 30, 'Layers.', lower_bound=1)
_ROUNDS = cli.rounds_flag(10)
_CACHED = flags.DEFINE_bool('cached', False, 'Every layer multiplies by the first layer\'s '
                            'weights, which stay in the last-level cache where one layer fits '
                            '(SmolLM2\'s: 14 MB): the products\' arithmetic without reads '
                            'from memory.')
_BASELINE = flags.DEFINE_string('baseline', '', 'Another version of decode_ops.cc, timed beside '
                                'the current kernel (float32 weights).')
_DECOMPOSE = flags.DEFINE_bool('decompose', False, 'Also time the scaled products with parts of '
                               'each run\'s work left out (decode_ops.cc built with '
                               'MTPJAX_SCALED_PARTS=1: the sums stored from the tile, not scaled; '
                               '=0: the tile products alone), whose outputs are wrong: what each '
                               'part costs, as the difference between columns.')

# The scaled paths --decompose adds: name, MTPJAX_SCALED_PARTS.
_PARTS = (('no scaling', 1), ('products only', 0))


def main(argv):
  cli.start(argv, persist=False)
  rows = cli.positive_ints(_ROWS.value, '--rows')
  if _BASELINE.value and not os.path.isfile(_BASELINE.value):
    cli.fail(f'--baseline {_BASELINE.value}: no such file')

  import jax
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax import kernels
  from mtp_jax import measure

  if not kernels.usable():
    cli.fail('the row kernel is not available here (see the note above, or MTP_JAX_KERNELS=0 is '
             'set)')

  def load(what, source, defines=()):  # a built library, loaded (it outlives its file)
    with tempfile.TemporaryDirectory() as build:
      library = os.path.join(build, 'variant.so')
      reason = kernels.compile_library(library, source=source, defines=defines)
      if reason:
        cli.fail(f'{what} does not build: {reason}')
      return ctypes.cdll.LoadLibrary(library)

  d, kv, f = _WIDTH.value, _KV_WIDTH.value, _FFN.value
  layer = [(d + 2 * kv, d), (d, d), (2 * f, d), (d, f)]
  cli.check_bytes(4 * _LAYERS.value * sum(n * k for n, k in layer), 'the matrices need',
                  f'{4 * _LAYERS.value:,} of them in float32',
                  '--width, --kv_width, --ffn and --layers')
  shapes = layer * _LAYERS.value
  whole = all(n % kernels.TILE_ROWS == 0 and k % kernels.TILE_COLUMNS == 0 for n, k in shapes)
  halves = kernels.tiles_usable() and whole  # two bfloat16 halves: the tile unit alone
  scaled_here = kernels.scaled_usable() and whole  # the tile unit, or the FMAs of AVX-512 or AVX2
  if _DECOMPOSE.value and not kernels.tiles_usable():
    cli.fail('--decompose times the tile unit\'s scaled products, which this CPU does not have')
  if _DECOMPOSE.value and not whole:
    cli.fail(f'--decompose needs whole tiles: products of rows a multiple of {kernels.TILE_ROWS} '
             f'and columns of {kernels.TILE_COLUMNS} (--width, --kv_width, --ffn)')
  # The paths through other builds of the kernel: name -> (its FFI target, the weights' form)
  extra = {}

  def add(name: str, library, symbol: str, form: str) -> bool:
    """Path `name` through `library`'s `symbol` on weights in `form` (float32, tiled or scaled);
    False when the library has no such symbol (versions before it)."""
    function = getattr(library, symbol, None)
    if function is None:
      return False
    target = f"mtpjax_rows_matmul_{name.replace(' ', '_')}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(function), platform='cpu')
    extra[name] = (target, form)
    return True

  scaled_symbol = kernels.SCALED_TARGETS['uint8'][1]  # Q4_1's, two integers to a byte
  if _BASELINE.value:
    loaded = load(f'--baseline {_BASELINE.value}', _BASELINE.value)
    if not add('baseline', loaded, 'RowsMatmul', 'float32'):
      cli.fail(f'--baseline {_BASELINE.value} has no RowsMatmul (the float32 row kernel)')
    if halves:
      add('baseline tiled', loaded, 'RowsMatmulTiled', 'tiled')
    # a version before the FMA form multiplies scaled tiles on the tile unit alone
    ready = getattr(loaded, 'ScaledReady', None)
    if scaled_here and (kernels.tiles_usable() or (ready is not None and ready())):
      add('baseline scaled', loaded, scaled_symbol, 'scaled')
  for name, parts in _PARTS * _DECOMPOSE.value:
    define = f'MTPJAX_SCALED_PARTS={parts}'
    add(name, load(f'the kernel with {define}', kernels.SOURCE, (define,)), scaled_symbol,
        'scaled')
  rng = np.random.default_rng(0)
  distinct = shapes[:4] if _CACHED.value else shapes
  def q4_1(w):  # w rounded to Q4_1's form (a float16 scale and offset a run of 32), as a GGUF
    # file's Q4_1 tensors dequantize to (padded with zeros to whole tiles, then cut back)
    padded = np.pad(w, ((0, -w.shape[0] % kernels.TILE_ROWS), (0, -w.shape[1] % kernels.RUN)))
    return np.asarray(kernels.unscaled(kernels.q4_1_tiles(padded)))[:w.shape[0], :w.shape[1]]

  # Weights as a GGUF file's Q4_1 blocks dequantize to (each entry also the sum of two bfloat16
  # numbers), so that every path multiplies the same ones.
  distinct_weights = [jnp.asarray(q4_1(rng.standard_normal(s, np.float32) * 0.02))
                      for s in distinct]
  repeat = len(shapes) // len(distinct_weights)
  weights = distinct_weights * repeat
  if halves and not all(kernels.two_bfloat16(w) for w in distinct_weights):
    cli.fail('the random Q4_1 weights do not all split into two bfloat16 numbers')
  tiled = [kernels.tiled(w) for w in distinct_weights] * repeat if halves else []
  scaled = ([kernels.scaled_tiles_if_exact(w) for w in distinct_weights] * repeat
            if scaled_here else [])
  if any(t is None for t in scaled):
    cli.fail('the random Q4_1 weights are not all in the form of kernels.ScaledTiles')
  bytes_read = sum(n * k * 4 for n, k in shapes)  # float32 bytes multiplied, from cache or not

  kernels.MAX_ROWS = kernels.MAX_UNROLLED_ROWS = 1 << 30  # the kernel path takes every M at once

  def product(x, w, path):
    if path in extra:
      target, form = extra[path]
      args = (w.q, w.scales) if form == 'scaled' else (w,)
      return jax.ffi.ffi_call(target,
                              jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, *args)
    return kernels.rows_matmul(x, w, path in ('kernel', 'tiled', 'scaled'))

  def chain(path):
    @jax.jit
    def run(weights, x_d, x_f):
      total = 0.0
      for w in weights:  # each product's output reduced, so none is dead code
        y = product(x_d if w.shape[1] == d else x_f, w, path)[0, 0]
        total = total + y
        # The next product waits for this one, as a decoding step's do: independent products
        # would run two at a time on XLA's threads, each on one core.
        x_d, x_f, _ = jax.lax.optimization_barrier((x_d, x_f, y))
      return total
    return run

  names = ['kernel'] + ['tiled'] * halves + ['scaled'] * scaled_here + list(extra) + ['xla']
  paths = {p: chain(p) for p in names}
  forms = {'tiled': 'tiled', 'scaled': 'scaled', **{p: form for p, (_, form) in extra.items()}}
  operands = {p: {'tiled': tiled, 'scaled': scaled}.get(forms.get(p), weights) for p in names}
  path_bytes = {p: sum(leaf.nbytes for leaf in jax.tree.leaves(operands[p])) for p in names}
  base = {}
  held = f' (one layer\'s {sum(w.size * 4 for w in distinct_weights) / 1e6:.1f} MB, reused)'
  print(f'{len(shapes)} products, {bytes_read / 1e6:.0f} MB of float32 weights'
        + (held if _CACHED.value else ''))
  print(f'{"rows":>5} | ' + ' | '.join(f'{p}: ms   GFLOP/s  GB/s  x first' for p in paths))
  for M in rows:
    x_d = jnp.asarray(rng.standard_normal((M, d), np.float32))
    x_f = jnp.asarray(rng.standard_normal((M, f), np.float32))
    for i, w in enumerate(weights[:4]):  # each shape's outputs, every path against XLA's dot
      x = x_d if w.shape[1] == d else x_f
      want = np.asarray(product(x, w, 'xla'))
      for p in names[:-1]:
        got = np.asarray(product(x, operands[p][i], p))
        if p in dict(_PARTS):  # wrong by design: a build that left nothing out would time nothing
          if np.allclose(got, want, rtol=1e-4, atol=1e-4):
            print(f'error: the {p} path\'s product equals XLA\'s dot: MTPJAX_SCALED_PARTS left '
                  'nothing out', file=sys.stderr)
            sys.exit(1)
          continue
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
          print(f'error: the {p} path\'s {M} x {w.shape[1]} by {w.shape[0]} product differs from '
                f'XLA\'s dot by up to {np.abs(got - want).max():.3g}', file=sys.stderr)
          sys.exit(1)
    seconds, _ = measure.fastest(
        [lambda p=p, fn=fn: fn(operands[p], x_d, x_f) for p, fn in paths.items()], _ROUNDS.value,
        warmup=True)  # the warm-up compiles each chain for M rows
    flop = 2 * M * bytes_read / 4
    cells = []
    for p, t in zip(paths, seconds):
      base.setdefault(p, t)
      cells.append(f'{t * 1e3:8.2f} {flop / t / 1e9:8.1f} {path_bytes[p] / t / 1e9:5.1f} '
                   f'{t / base[p]:6.2f}')
    print(f'{M:>5} | ' + ' | '.join(cells), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
