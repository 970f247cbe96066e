"""Native CPU kernels for decoding steps (decode_ops.cc), built with the host's compiler at first
use and called through XLA's FFI, each beside the pure-JAX computation it replaces. That
fallback runs wherever a kernel cannot: no compiler, another platform, bfloat16 inputs, attention
heads of a width the kernel does not take (attention_takes), or MTP_JAX_KERNELS=0; tests check
the two agree.

rows_matmul(x, w): x (..., K) times w (N, K) transposed (weights stored one output per row,
  which model.kernel_layout makes of the decoding params), each row's result the one it gets
  alone, however many rows (a few in a decoding step, more in a prefill); w in float32, in
  bfloat16 (half the bytes to read; widened to float32 in the kernel, products in float32), as
  Int8Rows (a quarter: int8 values widened in the kernel, times each row's float32 scale), or
  tiled (`tiled`: a float32 matrix whose entries are each the sum of two bfloat16 numbers, kept
  as those two for the CPU's tile unit, AMX, which multiplies up to 16 rows for the cost of one;
  any number of rows), or as ScaledTiles (`scaled_tiles_if_exact`: a matrix whose every run of
  32 entries along a row is a scale times small integers, plus an offset or not, as a GGUF
  file's Q4_1, Q4_0, Q8_0 and Q5_0 tensors dequantize: Q8_0's and Q5_0's integers one byte
  each, a quarter of float32's bytes, Q4_1's and Q4_0's two to a byte: on the tile unit, widened
  to bfloat16 tiles in the kernel, any number of rows; on a CPU with AVX-512 or AVX2 but no AMX,
  widened to float32 on its FMAs, each row's arithmetic its own: scaled_usable).
cache_attention(q, k, v, positions, slots): new entries' attention over a KV cache.
argmax(x): the first index of each row's largest value, as layers.greedy.
square_sums(x): each row's sum of squares in a fixed order (layers.row_sums's), as one call.
"""

import contextlib
import ctypes
import functools
import glob
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from mtp_jax import atomic, measure
from mtp_jax.matmul import matmul
from mtp_jax.pretrained import fetch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'decode_ops.cc')
# Rows per call of a row kernel (in passes of 4 over each thread's chunk of weight rows, the later
# passes reading it from L2): a batch-8 verify of 4 positions is 32 rows.
MAX_ROWS = 32
# The row kernels take MAX_ROWS rows a call, each call reading the weights again, so that every
# row's result is the one a single row gets: a verify of batch x positions rows equals the `ar`
# steps bit for bit, and a batch's prefill each prompt's own. Up to this many rows the calls are
# written out one by one; past it (a prefill) they run in a loop, one program whatever the rows.
MAX_UNROLLED_ROWS = 4 * MAX_ROWS
MAX_QUERIES = 64  # attention: query heads per kv head
# attention: head widths (decode_ops.cc's kMaxVectors); the kernel's step is its vector's lanes,
# 16 with AVX-512 and 8 without, and the wider step is taken everywhere
HEAD_WIDTH_STEP, MAX_HEAD_WIDTH = 16, 128
# The row kernel per weight dtype: its FFI target and the library's symbol for it.
ROWS_TARGETS = {'float32': ('mtpjax_rows_matmul', 'RowsMatmul'),
                'bfloat16': ('mtpjax_rows_matmul_bf16', 'RowsMatmulBf16'),
                'int8': ('mtpjax_rows_matmul_s8', 'RowsMatmulS8'),
                'uint32': ('mtpjax_rows_matmul_tiled', 'RowsMatmulTiled')}  # `tiled`
TILE_ROWS, TILE_COLUMNS = 16, 32  # a tiled matrix's (N, K) are multiples of these
# ScaledTiles: Q8_0's and Q5_0's integers (int8), Q4_1's and Q4_0's (0 to 15, with offsets)
SCALED_TARGETS = {'int8': ('mtpjax_rows_matmul_scaled_s8', 'RowsMatmulScaledS8'),
                  'uint8': ('mtpjax_rows_matmul_scaled8', 'RowsMatmulScaled8')}
# ScaledTiles: entries a scale covers; the largest integer of Q8_0's form, of Q4_1's (from 0)
RUN, RUN_LARGEST, RUN_LEVELS = 32, 127, 15
# Q5_0's d (q - 16) for 5-bit q: a symmetric form (stored as int8) of a scale, the run's largest
# magnitude / 16, times integers of at most 16, as Q8_0's is of its largest magnitude / 127
Q5_0_LARGEST = 16
# Q4_0's d (q - 8), q of 0 to 15: the largest magnitude takes -8, so d is that entry / -8
Q4_0_MIDDLE = 8


# -ffp-contract=off: GCC fuses a multiply and an add into one FMA in some template instances of
# the row kernel and not in others, which made a row's product depend on the number of rows
# beside it; the kernel writes its FMAs itself.
_FLAGS = ['-O3', '-ffp-contract=off', '-std=c++17', '-fPIC', '-shared', '-w']


def _cache_root() -> str:
  return os.path.join(fetch.cache_dir(), 'kernels')


def _compiler() -> list[str]:
  """The compiler's command: $CXX split as a shell would ('ccache g++'), or whole where it names
  a program as it is (a path with a space), else g++."""
  given = os.environ.get('CXX', '').strip()
  if not given:
    return ['g++']
  if shutil.which(given):
    return [given]
  try:
    return shlex.split(given)
  except ValueError:  # an unbalanced quote: as it is, which then names no program
    return [given]


def _compiler_version() -> str:
  try:
    return subprocess.run([*_compiler(), '--version'], capture_output=True, text=True).stdout
  except OSError:  # no compiler: nothing is built, so nothing is keyed
    return ''


def _source_key() -> str:
  """The source, flags, JAX and CPU the library is built for (it is built with -march=native)."""
  digest = hashlib.sha1(open(SOURCE, 'rb').read())
  digest.update(' '.join(_FLAGS).encode())
  digest.update(f'{jax.__version__} {jaxlib.__version__}'.encode())  # ffi.h is jaxlib's
  digest.update(measure.cpu_flags().encode())
  return digest.hexdigest()[:16]


def _machine_key(compiler: str | None = None) -> str:
  """The cache folder's name: _source_key, then the compiler (`compiler`: its --version, '' where
  there is none; by default the one $CXX names)."""
  compiler = _compiler_version() if compiler is None else compiler
  return f'{_source_key()}-{hashlib.sha1(compiler.encode()).hexdigest()[:8]}'


def compile_library(out: str, march: str = 'native', source: str = SOURCE,
                    defines: tuple[str, ...] = ()) -> str | None:
  """Compiles `source` (decode_ops.cc, or another version of it) into the shared library `out`
  for the instruction set -march=`march`, with the preprocessor `defines` (NAME=VALUE; only
  experiments set any). Returns None, or why it could not (the compiler's first error line)."""
  command = [*_compiler(), f'-march={march}', *_FLAGS, *(f'-D{d}' for d in defines),
             f'-I{jax.ffi.include_dir()}', source, '-o', out]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
  except OSError as e:
    return str(e)
  if not result.returncode:
    return None
  lines = [l.strip() for l in result.stderr.splitlines()]
  # the line that says why: a diagnostic of the compiler or the assembler, else the linker's
  # own (a full disk), not its wrapper's summary ('collect2: error: ld returned 1')
  for telling in (_diagnostic, lambda l: ': Error:' in l, lambda l: 'ld:' in l,
                  lambda l: 'error' in l.lower()):
    found = [l for l in lines if telling(l)]
    if found:
      return found[0]
  return '?'


def _diagnostic(line: str) -> bool:
  """A compiler's diagnostic ('FILE:LINE:COL: error: ...'), not the linker wrapper's summary."""
  return ': error:' in line and not line.startswith('collect2')


def _lasting(reason: str) -> bool:
  """Whether a build failure would come again with the same source, compiler and CPU (the key):
  a compiler's diagnostic ('FILE:LINE:COL: error: ...') or an assembler that does not know an
  instruction -march=native chose. Not GCC's fatal errors (a full disk, a killed compiler, a
  missing header), the linker's, nor a compiler that did not run."""
  return _diagnostic(reason) or (': Error:' in reason and ('no such instruction' in reason
                                                          or 'not supported' in reason))


_BUILT_HERE = set()  # libraries this process built (one that then does not load is recorded)


def _build() -> str | None:
  """Path of the compiled library (building it once per machine), or None when it cannot be. A
  build the compiler refuses with a diagnostic (which the same source, compiler and CPU, the
  same key, would give again) is recorded beside where the library would be, and later
  processes do not try again until that record is removed; a failure that may pass (no
  compiler, a full disk, a killed compiler) is not recorded."""
  compiler = _compiler_version()
  path = os.path.join(_cache_root(), _machine_key(compiler), 'decode_ops.so')
  if os.path.exists(path):
    return path
  if not compiler:  # none here: a library another compiler built for this source and CPU will do
    built = glob.glob(os.path.join(_cache_root(), f'{_source_key()}-*', 'decode_ops.so'))
    if built:
      return max(built, key=os.path.getmtime)
    if shutil.which(_compiler()[0]) is None:  # said without making a folder for a library
      print(f'note: decoding kernels not built (no compiler: {_compiler()[0]} is not found; '
            'set $CXX); decoding uses XLA alone', file=sys.stderr)
      return None
  failed = os.path.join(os.path.dirname(path), 'build_failed.txt')
  if os.path.exists(failed):
    with open(failed) as f:
      reason = f.read().strip()
    print(f'note: decoding kernels not built ({reason}); decoding uses XLA alone (remove '
          f'{failed} to try the build again)', file=sys.stderr)
    return None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for stale in glob.glob(os.path.join(os.path.dirname(path), 'tmp*.so')):  # a killed build's
      with contextlib.suppress(OSError):
        if time.time() - os.path.getmtime(stale) > 3600:
          os.remove(stale)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.so')
    os.close(fd)
  except OSError as e:  # a cache directory it cannot write (set $MTP_JAX_CACHE)
    print(f'note: decoding kernels not built ({e}); decoding uses XLA alone', file=sys.stderr)
    return None
  reason = compile_library(tmp)
  if reason:
    print(f'note: decoding kernels not built ({reason}); decoding uses XLA alone',
          file=sys.stderr)
    if os.path.exists(tmp):  # the linker may have removed it already
      os.remove(tmp)
    if _lasting(reason):
      _record_failure(path, reason)
    return None
  os.chmod(tmp, atomic.new_mode(executable=True))  # mkstemp's own is 0600: others could not load it
  os.replace(tmp, path)
  _BUILT_HERE.add(path)
  return path


def _record_failure(path: str, reason: str) -> None:
  with contextlib.suppress(OSError):
    atomic.write_text(os.path.join(os.path.dirname(path), 'build_failed.txt'), reason + '\n')


def _off(variable: str) -> bool:
  """Whether the switch $variable is off (unset or empty: on); a value that is neither is said
  once, and taken as off."""
  value = os.environ.get(variable, '1').strip().lower()
  if value in ('', '1', 'true', 'on', 'yes'):
    return False
  if value not in ('0', 'false', 'off', 'no'):
    _said_once(f'note: {variable}={value!r} is neither 1 (true, on, yes) nor 0 (false, off, no); '
               'taken as 0')
  return True


@functools.cache
def _said_once(line: str) -> None:
  print(line, file=sys.stderr)


def available() -> bool:
  """Whether the kernels are built and registered (once per process)."""
  return _library() is not None


@functools.cache
def _library():
  """The kernels' library, built, loaded and its FFI targets registered (once per process), or
  None where it cannot be."""
  if _off('MTP_JAX_KERNELS') or sysconfig.get_platform().startswith('win'):
    return None
  path = _build()
  if path is None:
    return None
  try:
    library = ctypes.cdll.LoadLibrary(path)
    targets = [(name, getattr(library, symbol)) for name, symbol in
               [*ROWS_TARGETS.values(), *SCALED_TARGETS.values(),
                ('mtpjax_cache_attention', 'CacheAttention'), ('mtpjax_argmax', 'Argmax'),
                ('mtpjax_square_sums', 'SquareSums')]]
    library.TiledReady.restype = ctypes.c_int
    library.ScaledReady.restype = ctypes.c_int
  except (OSError, AttributeError) as e:  # a damaged file, a missing libstdc++ symbol, noexec
    # One this process built would not load after another build either: recorded, as a refused
    # build is. One found in the cache may be damaged: removed, to be built again.
    again = path not in _BUILT_HERE
    removed = False
    with contextlib.suppress(OSError):
      os.remove(path)
      removed = True
    after = ''
    if again and not _compiler_version():  # one another compiler built (_build)
      after = '; no compiler here builds it again'
    elif again:
      after = (', and the library is built again next time' if removed else
               f'; remove {path} (or set MTP_JAX_CACHE elsewhere) to build it again')
    print(f'note: decoding kernels not loaded ({e}); decoding uses XLA alone{after}',
          file=sys.stderr)
    if not again:
      _record_failure(path, f'built, but not loaded: {e}')
    return None
  for name, function in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(function), platform='cpu')
  return library


def usable() -> bool:
  """Kernels on this process's devices: built, and a single CPU device (a custom call has no
  sharding rule, so a mesh of several devices keeps XLA's own ops)."""
  return jax.default_backend() == 'cpu' and jax.device_count() == 1 and available()


def _tiles_ready(symbol: str) -> bool:
  """The kernels are usable, MTP_JAX_TILES is not 0 and the library's `symbol` says yes."""
  return not _off('MTP_JAX_TILES') and usable() and bool(getattr(_library(), symbol)())


@functools.cache
def scaled_usable() -> bool:
  """Whether ScaledTiles' products run in a kernel here: the kernels are usable, the library was
  built for AVX-512, or AVX2 with FMA and F16C (the tile unit multiplies them where tiles_usable,
  else the FMAs), and MTP_JAX_TILES is not 0."""
  return _tiles_ready('ScaledReady')


@functools.cache
def tiles_usable() -> bool:
  """Whether tiled products run here: the kernels are usable, the library was built for a CPU
  with AMX (bfloat16 tiles), Linux let this process use the tile registers, and
  MTP_JAX_TILES is not 0."""
  return _tiles_ready('TiledReady')


def halves(w):
  """(hi, lo) in bfloat16: hi the float32 array w's bfloat16 rounding, lo that of w - hi. Their
  sum is w exactly for a GGUF file's 4-bit blocks dequantized (a float16 scale times a 4-bit
  integer, plus a float16 offset), not for float32 weights in general."""
  w = jnp.asarray(w, jnp.float32)
  hi = w.astype(jnp.bfloat16)
  return hi, (w - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _exact(w, hi, lo) -> bool:
  return bool(jnp.all(hi.astype(jnp.float32) + lo.astype(jnp.float32) == w))


def two_bfloat16(w) -> bool:
  """Whether every entry of the float32 matrix w is exactly the sum of its two `halves`."""
  return _exact(w, *halves(w))


def tiled_if_exact(w):
  """`tiled(w)` when every entry of w is the sum of its two `halves`, else None (one split for
  both the check and the tiles)."""
  hi, lo = halves(w)
  return _tiles(hi, lo) if _exact(w, hi, lo) else None


def tiled(w):
  """The float32 matrix w (N, K), N a multiple of 16 and K of 32, every entry exactly the sum of
  two bfloat16 numbers (two_bfloat16), as the tiled row kernel reads it: for each block of 16
  rows by 32 columns (row blocks first), the tile of its entries' his then that of their los,
  each 16 column pairs by 16 rows by 2 (AMX's layout of a product's second operand), the
  bfloat16 pairs stored as one uint32 so that the array keeps w's shape (and its 4 bytes an
  entry)."""
  return _tiles(*halves(w))


@flax.struct.dataclass
class ScaledTiles:
  """A float32 matrix w (N, K) whose every run of RUN entries along a row is a float16 scale
  times small integers, plus (`affine`) a float16 offset: a GGUF file's Q8_0 tensors dequantized
  (a scale, the run's largest magnitude / 127, times int8 values; Q5_0's alike, the magnitude
  / 16) and its Q4_1 ones (a scale, (largest - least) / 15, times integers 0
  to 15, plus the run's least value; Q4_0's too, its d (q - 8) as d q - 8 d). The integers,
  exact in bfloat16, in the tile unit's order, one tile per block of 16 rows by 32 columns (row
  blocks first): the symmetric forms' one byte an entry, the affine ones' two to a byte, where
  float32 takes 4; the kernel widens each tile to bfloat16 as it reads it. It stands in for the
  matrix wherever layers.dense reads one (shape, ndim, reshape), its arrays keeping their own
  shapes."""
  # the tiles: the symmetric forms' integers as int8 (N, K); the affine ones' as uint8 (N, K / 2),
  # two to a byte (in each 32 bytes, the low nibbles hold 32 entries of the tile and the high ones
  # the next 32)
  q: jax.Array
  # float16 (N / 16, K / 32, S, 16): per block, its 16 rows' scales, then (S = 2) their offsets
  scales: jax.Array
  # the matrix's shape: (N, K), or as a param (layers.dense reshapes it to N x K)
  shape: tuple = flax.struct.field(pytree_node=False)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def affine(self) -> bool:
    return self.scales.shape[2] == 2

  def reshape(self, *shape):
    size = math.prod(self.shape)
    if -1 in shape:
      known = math.prod(d for d in shape if d != -1)
      shape = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(shape) != size:
      raise ValueError(f'cannot reshape a {self.shape} matrix to {shape}')
    return self.replace(shape=tuple(shape))


def _symmetric(largest):
  """A symmetric form's scale (the largest magnitude / `largest`) and no offset, from the runs
  (N, K / 32, 32) in float64, with the integers' range."""
  return lambda runs: (np.abs(runs).max(-1) / largest, None), -largest, largest


def _affine(runs):
  """Q4_1's scale and offset, from the runs (N, K / 32, 32) in float64."""
  least = runs.min(-1)
  return (runs.max(-1) - least) / RUN_LEVELS, least


def _q4_0(runs):
  """Q4_0's scale d and offset -8 d, from the runs (N, K / 32, 32) in float64: Q4_1's form
  (integers 0 to 15, two to a byte) for a Q4_0 tensor."""
  largest = np.take_along_axis(runs, np.abs(runs).argmax(-1)[..., None], -1)[..., 0]
  scale = -largest / Q4_0_MIDDLE
  return scale, -Q4_0_MIDDLE * scale


def _fits(runs, form, lowest, highest):
  """(integers, [scale] or [scale, offset]) when every run has the form exactly, else None."""
  scale, offset = form(runs)
  base = np.zeros_like(scale) if offset is None else offset
  q = np.round((runs - base[..., None]) / np.where(scale == 0, 1, scale)[..., None])
  kept = [scale] if offset is None else [scale, offset]
  if not (np.all((q >= lowest) & (q <= highest))
          and np.all(q * scale[..., None] + base[..., None] == runs)
          and all(np.all(v.astype(np.float16) == v) for v in kept)):
    return None
  return q, kept


def _runs(w):
  """The float matrix w (N, K) as its runs of 32 entries (N, K / 32, 32) in float64, or None
  when it is not in whole tiles (N a multiple of 16, K of 32)."""
  w = np.asarray(w, np.float32)
  N, K = w.shape
  if N % TILE_ROWS or K % TILE_COLUMNS:
    return None
  return w.reshape(N, K // RUN, RUN).astype(np.float64)


def scaled_tiles_if_exact(w):
  """`w` as ScaledTiles when it has one of their forms exactly (N a multiple of 16, K of 32; its
  scales and offsets float16 numbers), else None: a GGUF file's Q8_0 and Q5_0 tensors
  dequantized (their integers one byte each) and its Q4_0 and Q4_1 ones (integers 0 to 15 two
  to a byte, with offsets: -8 times the scale for Q4_0). In NumPy and float64, where the values
  d q + o are exact and the division by the integers' range finds a float16 scale exactly
  (XLA's CPU division is not exact). Each form is tried on the first block of 16 rows before
  the whole matrix."""
  runs = _runs(w)
  if runs is None:
    return None
  forms = (_symmetric(RUN_LARGEST), (_q4_0, 0, RUN_LEVELS), _symmetric(Q5_0_LARGEST),
           (_affine, 0, RUN_LEVELS))
  for form in forms:
    if _fits(runs[:TILE_ROWS], *form) is None:
      continue
    fitted = _fits(runs, *form)
    if fitted is not None:
      return _scaled_tiles(*fitted)
  return None


def _scaled_tiles(q, kept) -> ScaledTiles:
  """ScaledTiles from the integers q (N, K / 32, 32: int8's range without offsets, 0 to 15 with
  them) and [scale] or [scale, offset] (N, K / 32), float16 numbers."""
  N, K = q.shape[0], q.shape[1] * RUN
  # symmetric forms' one byte each, affine ones' two to a byte (the kernel widens them to
  # bfloat16 tiles)
  if len(kept) == 1:
    q = _tile_order(jnp.asarray(q.reshape(N, K), jnp.int8)).reshape(N, K)
  else:
    q = _nibbles(_tile_order(jnp.asarray(q.reshape(N, K), jnp.uint8))).reshape(N, K // 2)
  scales = np.stack(kept, axis=-1).astype(np.float16)  # N, K / 32, S
  return ScaledTiles(q, jnp.asarray(
      scales.reshape(N // TILE_ROWS, TILE_ROWS, K // RUN, -1).transpose(0, 2, 3, 1)),
      shape=(N, K))


def q4_1_tiles(w) -> ScaledTiles | None:
  """The float matrix w (N, K) rounded to Q4_1's form as ScaledTiles (N a multiple of 16, K of
  32; else None): each run of 32 entries along a row becomes a float16 offset (the run's least
  value, rounded), a float16 scale (the run's range over that offset / 15, rounded) and integers
  0 to 15, each entry's nearest (clipped where the rounded offset passed the least value). Half
  a byte an entry and 4 bytes a run, where int8 rows take one byte an entry."""
  runs = _runs(w)
  if runs is None:
    return None
  offset = runs.min(-1).astype(np.float16).astype(np.float64)
  scale = ((runs.max(-1) - offset) / RUN_LEVELS).astype(np.float16).astype(np.float64)
  safe = np.where(scale > 0, scale, 1.0)[..., None]
  q = np.clip(np.round((runs - offset[..., None]) / safe), 0, RUN_LEVELS)
  return _scaled_tiles(q, [scale, offset])


def float32_matrix(w):
  """The float32 matrix (N, K) that w holds: from ScaledTiles or two-halves tiles, else w."""
  if isinstance(w, ScaledTiles):
    return unscaled(w)
  return untiled(w) if w.dtype == jnp.uint32 else w


def _nibbles(tiles):
  """Tiles of integers 0 to 15 (T, 512) two to a byte (T, 256): in each run of 64 entries, the
  first 32 in the low nibbles of 32 bytes, the next 32 in their high nibbles."""
  runs = tiles.reshape(-1, 2, 32)
  return (runs[:, 0] | (runs[:, 1] << 4)).reshape(tiles.shape[0], -1)


def _from_nibbles(packed):
  """_nibbles' tiles (T, 512) back from their bytes (T, 256)."""
  runs = packed.reshape(-1, 1, 32)
  return jnp.concatenate([runs & 15, runs >> 4], axis=1).reshape(packed.shape[0], -1)


def unscaled(t: ScaledTiles):
  """The float32 matrix (N, K) back from its ScaledTiles."""
  N, K = t.scales.shape[0] * TILE_ROWS, t.scales.shape[1] * RUN
  tiles = t.q.reshape(N * K // (TILE_ROWS * TILE_COLUMNS), -1)
  if t.q.dtype == jnp.uint8:
    tiles = _from_nibbles(tiles)
  q = _matrix_order(tiles, N, K)  # int8 or uint8
  scales = t.scales.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(N, K // RUN, -1, 1)
  w = q.astype(jnp.float32).reshape(N, K // RUN, RUN) * scales[:, :, 0]
  if t.affine:
    w = w + scales[:, :, 1]
  return w.reshape(N, K)


def _tile_order(m):
  """The matrix m (N, K) as tiles, one a row for each block of 16 rows by 32 columns (row blocks
  first): AMX's layout of a product's second operand, 16 column pairs by 16 rows by 2; bfloat16
  as uint16 bits, any other dtype as it is."""
  N, K = m.shape
  if m.dtype == jnp.bfloat16:
    m = jax.lax.bitcast_convert_type(m, jnp.uint16)
  blocks = m.reshape(N // TILE_ROWS, TILE_ROWS, K // TILE_COLUMNS, TILE_COLUMNS // 2, 2)
  # row block, column block, pair, row, 2
  return blocks.transpose(0, 2, 3, 1, 4).reshape(-1, TILE_ROWS * TILE_COLUMNS)


def _matrix_order(tiles, N: int, K: int):
  """_tile_order's matrix back from its tiles: bfloat16 from uint16 bits, else as it is."""
  blocks = tiles.reshape(N // TILE_ROWS, K // TILE_COLUMNS, TILE_COLUMNS // 2, TILE_ROWS, 2)
  m = blocks.transpose(0, 3, 1, 2, 4).reshape(N, K)
  return jax.lax.bitcast_convert_type(m, jnp.bfloat16) if m.dtype == jnp.uint16 else m


def _tiles(hi, lo):
  """Each block's hi tile then its lo tile, the pairs of bfloat16 values as one uint32."""
  N, K = hi.shape
  both = jnp.stack([_tile_order(hi), _tile_order(lo)], axis=1)  # block, half, tile
  return jax.lax.bitcast_convert_type(both.reshape(N, K, 2), jnp.uint32)


def untiled(t):
  """`tiled`'s float32 matrix back from its tiles."""
  N, K = t.shape
  both = jax.lax.bitcast_convert_type(t, jnp.uint16).reshape(-1, 2, TILE_ROWS * TILE_COLUMNS)
  hi, lo = (_matrix_order(both[:, h], N, K).astype(jnp.float32) for h in (0, 1))
  return hi + lo


def _float32(*arrays) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays)


@flax.struct.dataclass
class Int8Rows:
  """A matrix stored (out..., in...) as int8 values and one float32 scale per output row: row n
  is values[n] * scale[n]. It stands in for the float matrix wherever layers.dense reads one
  (shape, ndim, reshape), and its values come first among its leaves, so Flax's check of a
  param's shape sees the matrix's."""
  values: jax.Array  # int8, (out..., in...)
  scale: jax.Array  # float32, (out...)

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  @property
  def dtype(self):
    return self.values.dtype

  def reshape(self, rows: int, width: int):
    return Int8Rows(self.values.reshape(rows, width), self.scale.reshape(rows))


def quantize_rows(w, in_dims: int = 1) -> Int8Rows:
  """w (out..., in...) rounded to int8 per output row, symmetric: the scale is the row's largest
  magnitude / 127, so every value is within half a scale step of w (an all-zero row stays zero)."""
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(w.ndim - in_dims, w.ndim))
  scale = jnp.max(jnp.abs(w), axis=axes) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0).reshape(scale.shape + (1,) * in_dims)
  values = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
  return Int8Rows(values, scale)


def narrowed(w, dtype: str, in_dims: int = 1):
  """A float matrix w (out..., in...) stored in `dtype` as the kernels read it: float32 or
  bfloat16 as it is, int8 as Int8Rows, q4_1 as ScaledTiles (q4_1_tiles, for the scaled tiles'
  kernels; as Int8Rows where the shape is not in whole tiles)."""
  if dtype == 'q4_1':
    tiles = q4_1_tiles(w.reshape(-1, math.prod(w.shape[w.ndim - in_dims:])))
    if tiles is not None:
      return tiles.reshape(*w.shape)
    dtype = 'int8'
  return quantize_rows(w, in_dims) if dtype == 'int8' else w.astype(dtype)


def rows_matmul(x, w, use_kernel: bool = True, exact: bool = True):
  """x (..., K) @ w.T for w (N, K), in x's dtype (w, if narrower, widened to it). Through a
  kernel, each row's result is the same whatever the number of rows: the row kernels take them
  MAX_ROWS at a time (the tile kernels take any number at once). Without `exact`, XLA's dot,
  faster at many rows, takes products past MAX_UNROLLED_ROWS rows."""
  scaled = isinstance(w, ScaledTiles)
  held = (w.q.shape[0], w.q.shape[1] * (2 if w.affine else 1)) if scaled else w.shape
  if len(w.shape) != 2 or w.shape[1] != x.shape[-1] or tuple(held) != tuple(w.shape):
    raise ValueError(f'rows_matmul takes w as (N, K={x.shape[-1]}), got {tuple(w.shape)}'
                     + (f' holding {tuple(held)}' if scaled else ''))
  if scaled or w.dtype == jnp.uint32:  # tiles: any number of rows in a kernel, else XLA
    if use_kernel and _float32(x) and (scaled_usable() if scaled else tiles_usable()):
      target, operands = ((SCALED_TARGETS[jnp.dtype(w.q.dtype).name], (w.q, w.scales)) if scaled
                          else (ROWS_TARGETS['uint32'], (w,)))
      return jax.ffi.ffi_call(target[0], jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]),
                                                             jnp.float32))(x, *operands)
    w = float32_matrix(w)
  narrow = isinstance(w, Int8Rows)
  values = w.values if narrow else w
  # int8 values reach their target only as Int8Rows, which carry the scales
  dtype = jnp.dtype(values.dtype).name
  target = ROWS_TARGETS.get(dtype) if narrow == (dtype == 'int8') else None
  rows = x.size // max(x.shape[-1], 1)
  if (use_kernel and target and 0 < rows and (exact or rows <= MAX_UNROLLED_ROWS) and _float32(x)
      and usable()):
    def call(part):
      return jax.ffi.ffi_call(target[0], jax.ShapeDtypeStruct((len(part), values.shape[0]),
                                                              jnp.float32))(part, values)
    flat = x.reshape(-1, x.shape[-1])
    if rows <= MAX_UNROLLED_ROWS:
      out = jnp.concatenate([call(flat[i:i + MAX_ROWS]) for i in range(0, rows, MAX_ROWS)])
    else:  # MAX_ROWS-row calls in a loop; the padding rows' results are dropped
      parts = jnp.pad(flat, ((0, -rows % MAX_ROWS), (0, 0))).reshape(-1, MAX_ROWS, flat.shape[1])
      out = jax.lax.map(call, parts).reshape(-1, values.shape[0])[:rows]
    out = out.reshape(*x.shape[:-1], -1)
  else:  # values.T widened to x's dtype
    out = matmul(x.reshape(-1, x.shape[-1]), values.T.astype(x.dtype)).reshape(
        *x.shape[:-1], -1)
  return out * w.scale.astype(out.dtype) if narrow else out


def attention_takes(width: int, groups: int) -> bool:
  """Whether the attention kernel takes heads `width` entries wide with `groups` query heads per
  kv head (where it does not, XLA attends, and a position of a verify or a batch may round as it
  would not alone)."""
  return (width % HEAD_WIDTH_STEP == 0 and 0 < width <= MAX_HEAD_WIDTH
          and groups <= MAX_QUERIES)


def cache_attention(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxT, slots_BxT,
                    use_kernel: bool = True):
  """Each new entry's attention over the cache slots it sees (layers.visible_slots; float32),
  or None when the kernel cannot take these shapes (the caller then attends with XLA)."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxLxKxE.shape[2]
  if (v_BxLxKxE.shape != k_BxLxKxE.shape or k_BxLxKxE.shape[0] != B or k_BxLxKxE.shape[3] != E
      or positions_BxT.shape != (B, T) or slots_BxT.shape != (B, T)):
    raise ValueError(f'cache_attention: q {q_BxTxHxE.shape}, k {k_BxLxKxE.shape}, v '
                     f'{v_BxLxKxE.shape}, positions {positions_BxT.shape} and slots '
                     f'{slots_BxT.shape} are not (B, T, H, E), (B, L, K, E) twice and (B, T)')
  if not (use_kernel and attention_takes(E, H // K)
          and _float32(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE) and usable()):
    return None
  out = jax.ffi.ffi_call('mtpjax_cache_attention', jax.ShapeDtypeStruct(q_BxTxHxE.shape,
                                                                         jnp.float32))
  return out(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxT.astype(jnp.int32),
             slots_BxT.astype(jnp.int32))


def argmax(x_xV, use_kernel: bool = True):
  """The first index of the largest value along x's last axis (int32), the token layers.greedy
  takes (V - 1 for a row holding a NaN, where greedy gives some valid id), or None when the
  kernel cannot run (the caller then takes layers.greedy). For decoding's tokens: it has no
  gradient (its input's is stopped) and vmaps over leading axes."""
  if not (use_kernel and x_xV.shape[-1] > 0 and _float32(x_xV) and usable()):
    return None
  return jax.ffi.ffi_call('mtpjax_argmax', jax.ShapeDtypeStruct(x_xV.shape[:-1], jnp.int32),
                          vmap_method='broadcast_all')(jax.lax.stop_gradient(x_xV))


def square_sums(x_xN):
  """The sums of x's squares over its last axis (kept, of size 1), each in layers.row_sums's
  order with every operation rounded on its own, so a row's sum does not depend on the rows
  beside it; one call that XLA compiles at once where row_sums's adds are tens of operations per
  norm. None when the kernel cannot run (the caller then takes row_sums, whose last bit may
  differ where XLA fuses a square and an add). For decoding: it has no gradient (its input's is
  stopped)."""
  if not (x_xN.shape[-1] > 0 and _float32(x_xN) and usable()):
    return None
  return jax.ffi.ffi_call('mtpjax_square_sums', jax.ShapeDtypeStruct(x_xN.shape[:-1] + (1,),
                                                                  jnp.float32),
                          vmap_method='broadcast_all')(jax.lax.stop_gradient(x_xN))
