"""A GGUF file's header walked with every count and length checked against the file, before the
`gguf` package's reader reads it. That reader takes a read past the end as an empty one, so a
damaged array count (2**40 tokens) has it loop, its memory growing, until the machine has none;
it places a tensor at its recorded offset whatever that is (one that wraps round reads the
header as weights); and it decodes text only when asked, deep in a tokenizer's making. Here each
of those is one line, as llama.cpp refuses them: every value within the file, every text UTF-8,
and the tensors laid out as llama.cpp lays them out, each at the aligned end of the one before.
"""

import math
import mmap
import struct

import gguf
import numpy as np

# Value types (gguf's GGUFValueType): the bytes of each fixed-size one, as gguf's reader reads it
_SIZES = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
_STRING, _ARRAY, _UINT32 = (int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY),
                            int(gguf.GGUFValueType.UINT32))
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_NESTING = 4  # arrays of arrays a file may hold (llama.cpp's own files hold none)
_QUANT_SIZES = {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}


class Damaged(ValueError):
  """What is wrong with the file, as the end of one line."""


class _Cursor:
  """Reads of the mapped file from a moving offset, each checked against its end."""

  def __init__(self, data, order: str):
    self.data, self.order, self.at = data, order, 0

  def left(self) -> int:
    return len(self.data) - self.at

  def take(self, fmt: str, what: str):
    size = struct.calcsize(fmt)
    if size > self.left():
      raise Damaged(f'cut short in {what}')
    values = struct.unpack_from(self.order + fmt, self.data, self.at)
    self.at += size
    return values[0] if len(values) == 1 else values

  def skip(self, size: int, what: str) -> None:
    if size > self.left():
      raise Damaged(f'{what} runs past the end of the file')
    self.at += size

  def text(self, what: str) -> str:
    length = self.take('Q', what)
    if length > self.left():
      raise Damaged(f'{what} is a text of {length} bytes, past the end of the file')
    raw = self.data[self.at:self.at + length]
    self.at += length
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      raise Damaged(f'{what} is not UTF-8 text') from None


def _value(c: _Cursor, kind: int, key: str, nesting: int = 0):
  """Steps over one value of type `kind`; returns it where it is a 32-bit unsigned integer (the
  alignment), else None."""
  if kind == _UINT32:
    return c.take('I', key)
  if kind in _SIZES:
    c.skip(_SIZES[kind], key)
  elif kind == _STRING:
    c.text(key)
  elif kind == _ARRAY and nesting < _NESTING:
    item, count = c.take('I', key), c.take('Q', key)
    # the least each item takes: its bytes, a text's length, an array's type and count
    least = _SIZES.get(item, {_STRING: 8, _ARRAY: 12}.get(item))
    if least is None:
      raise Damaged(f'{key} is an array of unknown value type {item}')
    if count * least > c.left():
      raise Damaged(f'{key} is an array of {count} items, past the end of the file')
    if item in _SIZES:
      c.skip(count * least, key)
    else:
      for _ in range(count):
        _value(c, item, key, nesting + 1)
  else:
    raise Damaged(f'{key} has unknown value type {kind}' if kind != _ARRAY
                  else f'{key} nests arrays more than {_NESTING} deep')
  return None


def check(path: str) -> None:
  """Raises Damaged unless the header of the GGUF file at `path` lies within it, its texts are
  UTF-8 and its tensors are laid out end to end at the alignment; a file of a version or tensor
  type the reader does not know is left for it to refuse."""
  with open(path, 'rb') as f:
    if not f.seek(0, 2):
      raise Damaged('the file is empty')
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      _check(data)


def _check(data) -> None:
  if data[:4] != b'GGUF':
    return  # not GGUF at all: the reader says so
  if len(data) < 8:
    raise Damaged('cut short in the version')
  order = '<' if struct.unpack_from('<I', data, 4)[0] & 0xFFFF else '>'  # as the reader tells
  c = _Cursor(data, order)
  c.at = 4
  if c.take('I', 'the version') not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
    return
  tensors, keys = c.take('QQ', 'the counts')
  if keys * 12 > c.left() or tensors * 24 > c.left():  # a key's length and type; a tensor's info
    raise Damaged(f'it counts {keys} metadata keys and {tensors} tensors, more than the file holds')
  alignment = gguf.GGUF_DEFAULT_ALIGNMENT
  for _ in range(keys):
    key = c.text('a metadata key')
    kind = c.take('I', key)
    value = _value(c, kind, key)
    if key == 'general.alignment':
      if kind != _UINT32:  # as gguf's reader and llama.cpp take it
        raise Damaged('general.alignment is not a 32-bit unsigned integer')
      alignment = value
  if alignment < 1 or alignment & (alignment - 1):
    raise Damaged(f'general.alignment={alignment} is not a power of two')
  infos = []
  for _ in range(tensors):
    name = c.text('a tensor name')
    dims = c.take('I', name)
    if dims > _MAX_DIMS:
      raise Damaged(f"tensor '{name}' has {dims} dimensions, more than {_MAX_DIMS}")
    shape = c.take(f'{dims}Q', name)
    shape = shape if isinstance(shape, tuple) else (shape,)
    infos.append((name, shape, c.take('I', name), c.take('Q', name)))
  start = -(-c.at // alignment) * alignment
  expected = 0
  for name, shape, kind, offset in infos:
    if kind not in _QUANT_SIZES:
      return  # a type the reader does not know, refused by name once it reads the tensors
    block, size = _QUANT_SIZES[kind]
    entries = math.prod(shape)
    if entries % block:
      raise Damaged(f"tensor '{name}' has {entries} entries, not whole blocks of {block}")
    if offset != expected:
      raise Damaged(f"tensor '{name}' has offset {offset}, expected {expected}"
                    + (' (the aligned end of the tensor before it)' if expected else ''))
    nbytes = entries // block * size
    if start + offset + nbytes > len(data):
      raise Damaged(f"tensor '{name}' runs past the end of the file")
    expected = offset + -(-nbytes // alignment) * alignment
