"""Whether the tokenizer this project builds from GGUF metadata gives llama.cpp's token ids:
SmolLM2's GGUF file copied with its pre-tokenizer name (tokenizer.ggml.pre) replaced by each of
--pres, then our tokenizer (mtp_jax.pretrained) and llama.cpp's (llama-cpp-python, the vocabulary alone)
encode the same texts: --chars-long pieces of this repository's README and RESULTS.md, prompts
and sources and of the standard library's pydoc topics, special tokens parsed by both.

Run (in the peers' environment, see bench_peers.py):
  .venv-peers/bin/python experiments/tokenizer_parity.py \
      [--pres default,gpt-2,smollm,llama-bpe,qwen2,deepseek-r1-qwen]
Prints, per name, how many texts (and tokens) give the same ids, and for the first texts that do
not, where they part.
"""

import glob
import os
import sys
import sysconfig
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_PRES = flags.DEFINE_list('pres', ['default', 'gpt-2', 'smollm'],
                          'tokenizer.ggml.pre names to compare under.')
_CHARS = flags.DEFINE_integer('chars', 2000, 'Characters per text.', lower_bound=1)
_PER_FILE = flags.DEFINE_integer('per_file', 100, 'Texts from each file at most.', lower_bound=1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts(chars: int, per_file: int) -> list[str]:
  files = [os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'experiments', 'RESULTS.md'),
           *sorted(glob.glob(os.path.join(ROOT, 'configs', 'prompts', '*.txt'))),
           *sorted(glob.glob(os.path.join(ROOT, 'mtp_jax', '*.py'))),
           os.path.join(sysconfig.get_paths()['stdlib'], 'pydoc_data', 'topics.py')]
  out = []
  for path in files:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    out += [text[i:i + chars] for i in range(0, len(text), chars)][:per_file]
  return out


def renamed_copy(source: str, pre: str, out: str) -> None:
  """`source` with tokenizer.ggml.pre set to `pre` (every other key and tensor as it was)."""
  import gguf
  from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
  reader = gguf.GGUFReader(source)
  writer = gguf.GGUFWriter(out, reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
  copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.PRE: MetadataDetails(
      gguf.GGUFValueType.STRING, pre)}, [])


def main(argv):
  cli.start(argv, persist=False)
  cli.require_peers('llama_cpp')
  from llama_cpp import Llama
  from mtp_jax.pretrained import fetch, resolve
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  from bench_peers import first_difference
  corpus = texts(_CHARS.value, _PER_FILE.value)
  source = fetch.fetch('smollm2')
  with tempfile.TemporaryDirectory() as tmp:
    for pre in _PRES.value:
      path = os.path.join(tmp, f'{pre}.gguf')
      renamed_copy(source, pre, path)
      ours = resolve.open_model(path).tokenizer
      theirs = Llama(model_path=path, vocab_only=True, verbose=False)
      ids = [(ours.encode(t, add_special_tokens=False).ids,
              theirs.tokenize(t.encode(), add_bos=False, special=True)) for t in corpus]
      differ = [i for i, (a, b) in enumerate(ids) if a != b]
      print(f'{pre}: {len(corpus) - len(differ)} of {len(corpus)} texts give the same ids '
            f'({sum(len(a) for a, _ in ids)} tokens ours)')
      for i in differ[:3]:
        a, b = ids[i]
        j = first_difference(a, b)
        print(f'  text {i} parts at token {j}: ours {a[j:j + 4]}, llama.cpp {b[j:j + 4]} '
              f'({corpus[i][:60]!r}...)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
