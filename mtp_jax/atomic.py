"""Files written whole or not at all: into a temporary file beside the target, flushed to disk,
then renamed over it, so a crash never leaves half a file for a later run to read. (Files that a
library writes itself, safetensors and .npy, follow the same pattern where they are saved.)"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# The umask, read once: os.umask can only be read by setting it, which other threads would see
# for that moment.
_UMASK = _umask()


def new_mode(executable: bool = False) -> int:
  """The mode a plain open() (or, `executable`, a linker or mkdir) gives a new file or folder:
  the umask applied."""
  return (0o777 if executable else 0o666) & ~_UMASK


def write_bytes(path: str, data: bytes) -> None:
  """`data` as the file `path`, whole or not at all (replacing)."""
  with replacing(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


@contextlib.contextmanager
def replacing(path: str):
  """Yields a temporary path beside `path` for the block to write (write_bytes, or a writer that
  takes a file name: gguf's); when the block ends it is flushed, given the mode a plain open()
  would give a new file (mkstemp's own is 0600) and renamed over `path`; if the block fails it is
  removed."""
  folder = os.path.dirname(path) or '.'
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, new_mode())
    sync(tmp)
    os.replace(tmp, path)
    sync(folder)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def replacing_folder(path: str):
  """Yields a temporary folder beside `path` for the block to fill (libraries' writers
  included); when the block ends its files are flushed and it takes the place of `path` whole,
  the old folder renamed aside first and then removed, so a crash never leaves `path` holding
  some new files beside old ones. If the block or the renames fail, `path` stays as it was."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + '.', suffix='.tmp')
  old = tmp[:-len('.tmp')] + '.old'
  try:
    yield tmp
    for name in os.listdir(tmp):
      sync(os.path.join(tmp, name))
    sync(tmp)  # its entries too, before it takes the old one's place
    os.chmod(tmp, new_mode(executable=True))  # mkdtemp's own is 0700
    if os.path.exists(path):
      os.replace(path, old)
    os.replace(tmp, path)
    sync(parent)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    if os.path.exists(old) and not os.path.exists(path):  # the new one never took its place
      os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def sync(path: str) -> None:
  """Flushes a file written with plain writes, or a folder's entries (a rename into it), to
  disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def exclusive(folder: str, waiting: str = ''):
  """Held by one process at a time (a lock on the folder itself, so no lock file is left
  beside what it guards): another waits, printing `waiting` first. The lock goes with the
  process, so a killed one never leaves it held. Yields whether it holds the lock (False on a
  file system without locks, where other processes may be inside too)."""
  fd = os.open(folder, os.O_RDONLY)
  held = True
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if waiting:
        print(waiting, file=sys.stderr)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a file system without locks (Lustre without -o flock, some FUSE)
      if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
        raise
      print(f'note: {folder} cannot be locked here ({e.strerror}); not waiting for other '
            'processes', file=sys.stderr)
      held = False
    yield held
  finally:
    os.close(fd)  # releases the lock


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj, indent: int = 1, **dumps_kwargs) -> None:
  """obj as json.dumps(obj, indent=indent, **dumps_kwargs) writes it."""
  write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs))
