"""Files written whole or not at all: into a temporary file beside the target, then renamed over
it, so a crash never leaves half a file for a later run to read."""

import json
import os
import tempfile


def write_bytes(path: str, data: bytes) -> None:
  folder = os.path.dirname(path) or '.'
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj, indent: int = 1) -> None:
  write_text(path, json.dumps(obj, indent=indent))
