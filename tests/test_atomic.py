"""Files written whole or not at all: a write that fails part way leaves the old file and no
temporary file beside it."""

import json
import os

import pytest

from mtp_jax import atomic


def test_write_json_replaces_whole_file(tmp_path):
  path = str(tmp_path / 'sub' / 'x.json')  # the folder is made
  atomic.write_json(path, {'a': 1})
  atomic.write_json(path, {'b': [1, 2]}, indent=2)
  assert json.load(open(path)) == {'b': [1, 2]}
  assert os.listdir(tmp_path / 'sub') == ['x.json']
  # The mode a plain open() gives (the umask applied to 0666), not the temporary file's 0600.
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / 'x.bin')
  atomic.write_bytes(path, b'old')
  with pytest.raises(TypeError):
    atomic.write_bytes(path, 12345)  # fails inside the write, after the temporary file exists
  assert open(path, 'rb').read() == b'old'
  assert os.listdir(tmp_path) == ['x.bin']


def test_replacing_renames_a_written_path_over_the_file_or_removes_it(tmp_path):
  """atomic.replacing, for writers that take a file name: the written temporary path replaces the
  file (with a plain open()'s mode) when the block ends; a block that fails leaves the old file
  and no temporary one."""
  path = str(tmp_path / 'x.gguf')
  atomic.write_bytes(path, b'old')
  with pytest.raises(RuntimeError):
    with atomic.replacing(path) as tmp:
      open(tmp, 'wb').write(b'half')
      raise RuntimeError('the writer failed')
  assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['x.gguf']
  with atomic.replacing(path) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and tmp != path
    open(tmp, 'wb').write(b'new')
  assert open(path, 'rb').read() == b'new' and os.listdir(tmp_path) == ['x.gguf']
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
