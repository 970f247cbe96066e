"""Files written whole or not at all: a write that fails part way leaves the old file and no
temporary file beside it."""

import errno
import fcntl
import json
import os
import subprocess
import sys

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


def test_replacing_folder_puts_a_new_folder_in_place_whole_or_not_at_all(tmp_path, monkeypatch):
  """atomic.replacing_folder (an export): the filled folder takes the old one's place, none of
  the old files left in it; a block that fails leaves the old folder as it was; no temporary
  folder is left either way."""
  path = tmp_path / 'export'
  with atomic.replacing_folder(str(path)) as tmp:
    for name in ('a', 'b'):
      (tmp_path / tmp / name).write_text('old')
  with pytest.raises(RuntimeError):
    with atomic.replacing_folder(str(path)) as tmp:
      (tmp_path / tmp / 'a').write_text('new')
      raise RuntimeError('the writer failed part way')
  assert sorted(os.listdir(path)) == ['a', 'b'] and (path / 'a').read_text() == 'old'
  with atomic.replacing_folder(str(path)) as tmp:
    (tmp_path / tmp / 'a').write_text('new')
  assert os.listdir(path) == ['a'] and (path / 'a').read_text() == 'new'
  assert os.listdir(tmp_path) == ['export']
  # the new folder's rename refused (the old one already set aside): the old one is put back
  replace = os.replace

  def refuse_the_second(src, dst, calls=[]):
    calls.append(src)
    if len(calls) == 2:
      raise OSError('rename refused')
    replace(src, dst)
  monkeypatch.setattr(os, 'replace', refuse_the_second)
  with pytest.raises(OSError, match='rename refused'):
    with atomic.replacing_folder(str(path)) as tmp:
      (tmp_path / tmp / 'c').write_text('newer')
  monkeypatch.undo()
  assert os.listdir(path) == ['a'] and (path / 'a').read_text() == 'new'
  assert os.listdir(tmp_path) == ['export']
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask  # a plain mkdir's, not mkdtemp's 0700


def test_replacing_folder_clears_what_a_killed_writer_left(tmp_path):
  """A writer killed (-9) while it fills its folder leaves that folder, and one killed between
  its two renames leaves the old folder set aside and `path` missing: the next call removes the
  first and puts the old folder back; a writer still at work keeps its folder."""
  path = tmp_path / 'export'
  path.mkdir()
  (path / 'a').write_text('old')
  child = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom mtp_jax import atomic\n'
       'with atomic.replacing_folder(sys.argv[1]) as tmp:\n'
       '  open(tmp + "/a", "w").write("half")\n  print(tmp, flush=True)\n  time.sleep(60)',
       str(path)], stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  killed = child.stdout.readline().strip()
  child.kill()
  child.wait()
  assert os.path.isdir(killed)
  # Died between its renames: its folder (unlocked, filled) and the old one set aside.
  os.replace(path, str(path) + '.writing-died_now.old')
  os.mkdir(str(path) + '.writing-died_now.tmp')
  for mine in ('export.old', 'export.step1000.old', 'export.backup.tmp'):  # the user's: left
    (tmp_path / mine).mkdir()
  with atomic.replacing_folder(str(path)) as tmp:
    with atomic.replacing_folder(str(path)) as inner:  # a second writer meanwhile
      assert os.path.isdir(tmp) and (path / 'a').read_text() == 'old'
      assert sorted(os.listdir(tmp_path)) == sorted(
          ['export', 'export.old', 'export.step1000.old', 'export.backup.tmp',
           os.path.basename(tmp), os.path.basename(inner)])
      (tmp_path / inner / 'a').write_text('inner')
    (tmp_path / tmp / 'a').write_text('new')
  assert (path / 'a').read_text() == 'new'
  assert sorted(os.listdir(tmp_path)) == ['export', 'export.backup.tmp', 'export.old',
                                          'export.step1000.old']


def test_exclusive_says_whether_it_holds_the_lock(tmp_path, monkeypatch):
  """A fetch cleans up after killed ones only while it holds the lock: on a file system without
  locks (here flock refused as Lustre without -o flock refuses it) it is not alone."""
  with atomic.exclusive(str(tmp_path)) as held:
    assert held is True

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with atomic.exclusive(str(tmp_path)) as held:
    assert held is False
