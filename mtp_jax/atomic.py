"""Files written whole or not at all: into a temporary file beside the target, flushed to disk,
then renamed over it, so a crash never leaves half a file for a later run to read. (Files that a
library writes itself, safetensors and .npy, follow the same pattern where they are saved.)"""

import contextlib
import errno
import fcntl
import json
import os
import re
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
  some new files beside old ones. If the block or the renames fail, `path` stays as it was.
  The writer holds a lock on its temporary folder; what a killed writer left (its temporary
  folder, or the old folder set aside when it died between the renames) is cleared by the next
  call, the old folder put back where `path` is missing."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  _clear_killed_writers(path)
  # Made under another name and locked before it takes a writer's name, so another call never
  # sees it unlocked and takes it for a killed writer's.
  made = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + '.making-')
  lock = os.open(made, os.O_RDONLY)
  _try_lock(lock)
  tmp = os.path.join(parent, os.path.basename(path) + _WRITER + made.rsplit('-', 1)[1] + '.tmp')
  old = tmp[:-len('.tmp')] + '.old'
  try:
    os.rename(made, tmp)
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
  finally:
    os.close(lock)


_WRITER = '.writing-'  # replacing_folder's folders: PATH.writing-XXXXXXXX.tmp (mkdtemp's 8), .old


def held_elsewhere(folder: str) -> bool:
  """Whether another process holds `folder`'s lock (exclusive) now; True where the file system
  has no locks (nothing then says it is free); False for a folder that does not exist."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:  # shared: two such checks at once do not see each other, a holder's exclusive lock is seen
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)  # releases it if this call took it


def _try_lock(fd: int) -> bool:
  """Whether this process now holds `fd`'s lock: False when another holds it, or the file
  system has no locks (then nothing counts as left by a killed writer)."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError:
    return False


def _clear_killed_writers(path: str) -> None:
  """replacing_folder's leftovers beside `path` whose writer is gone (nobody holds the lock of
  their temporary folder): the temporary folders are removed, an old folder set aside is put
  back if `path` is missing (the writer died between its renames) and removed otherwise."""
  parent, base = os.path.split(os.path.abspath(path))
  names = set(os.listdir(parent))
  ours = re.compile(re.escape(base + _WRITER) + r'[a-z0-9_]{8}\.(tmp|old)')
  for name in sorted(names):
    if not ours.fullmatch(name):
      continue
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(parent, stem + '.tmp')
    if stem + '.tmp' in names:
      try:
        fd = os.open(tmp, os.O_RDONLY)
      except OSError:  # gone meanwhile: its writer finished or failed
        continue
      try:
        if not _try_lock(fd):
          continue  # a writer at work
      finally:
        os.close(fd)
      shutil.rmtree(tmp, ignore_errors=True)
    if ext == '.old':
      if not os.path.exists(path):
        os.replace(os.path.join(parent, name), path)
      else:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


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
