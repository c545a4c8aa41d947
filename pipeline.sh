#!/usr/bin/env bash
# The Llama 2 safety pipeline in order, one command; it doubles as the table of contents of the method.
#
#   ./pipeline.sh                      # tiny preset on the embedded world, everything under out/
#   OUT=runs/a PRESET=small ./pipeline.sh
#
# Each stage writes OUT/<stage>/ (model.pt, config.json, metrics.jsonl). A stage whose model.pt exists is reused;
# one that was interrupted (its .running marker is still there) continues with --resume. Delete a stage's folder
# to train it again. The evaluation reruns whenever a checkpoint is newer than OUT/eval/metrics.json.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
PRESET=${PRESET:-tiny}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
# Threads and cores: the tiny models' small matrix products gain little from a second thread and lose a lot
# when anything else holds the other core (evaluating 100 prompts on a loaded 2-core machine: 10 s with one
# thread, 59 s with two). So the stages that need only the SFT model and the RMs run JOBS at a time (default:
# 2 on a machine with 2 or more cores), one thread each, their output in OUT/logs/; the base model and SFT,
# which run alone, use every core. Set OMP_NUM_THREADS and JOBS to override, e.g. JOBS=1 for PRESET=small on a GPU.
JOBS=${JOBS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
ALONE_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

stage() {  # stage NAME COMMAND...: run COMMAND unless OUT/NAME/model.pt is already a finished checkpoint
  local name=$1 dir=$OUT/$1
  shift
  local extra=()
  if [[ -f $dir/model.pt && ! -f $dir/.running ]]; then
    echo "== $name: reusing $dir/model.pt"
    return
  fi
  if [[ -f $dir/model.pt ]]; then
    echo "== $name: an earlier run was interrupted; resuming it"
    extra=(--resume)
  else
    rm -rf "$dir"  # a run that died before its first checkpoint: start clean, without its partial logs
  fi
  echo "== $name: $* ${extra[*]}"
  mkdir -p "$dir"
  touch "$dir/.running"
  local start=$SECONDS
  "$@" "${extra[@]}"
  if [[ ! -f $dir/model.pt ]]; then
    echo "== $name: finished without writing $dir/model.pt" >&2
    exit 1
  fi
  rm -f "$dir/.running"
  echo "== $name: done in $((SECONDS - start)) s"
}

pids=() names=()
side_by_side() {  # side_by_side NAME COMMAND...: stage NAME in the background while JOBS > 1, else now
  if (( JOBS == 1 )); then
    stage "$@"
    return
  fi
  mkdir -p "$OUT/logs"
  echo "== $1: started, log in $OUT/logs/$1.log"
  stage "$@" > "$OUT/logs/$1.log" 2>&1 &
  pids+=($!) names+=("$1")
  if (( ${#pids[@]} >= JOBS )); then
    join
  fi
}

join() {  # wait for the stages started side by side; stop if one of them failed
  local i failed=0
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      echo "== ${names[$i]}: failed, see $OUT/logs/${names[$i]}.log" >&2
      failed=1
    fi
    grep -h "^== ${names[$i]}: \(reusing\|done\)" "$OUT/logs/${names[$i]}.log" || true
  done
  pids=() names=()
  (( failed == 0 )) || exit 1
}

# 0. Pre-training data audit (section 4.1): personal data, pronouns and identity terms in the base corpus
$PYTHON evaluate.py --audit > "$OUT/audit.txt"
echo "== audit: $OUT/audit.txt"

# 1. Base model: next-token pre-training on the world's unaligned corpus (section 2)
OMP_NUM_THREADS=$ALONE_THREADS stage base $PYTHON train_sft.py --stage base --preset "$PRESET" --out "$OUT/base"

# 2. Supervised fine-tuning on safety demonstrations, loss on answer tokens only (section 3.1)
OMP_NUM_THREADS=$ALONE_THREADS stage sft $PYTHON train_sft.py --stage sft --preset "$PRESET" --init "$OUT/base/model.pt" --out "$OUT/sft"

# 3. Reward models: binary ranking loss with margin, one per objective (section 3.2.2)
side_by_side rm_safety $PYTHON train_rm.py --objective safety --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --out "$OUT/rm_safety"
side_by_side rm_helpful $PYTHON train_rm.py --objective helpfulness --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --out "$OUT/rm_helpful"
join  # the stages below read both reward models

# 4. PPO with the gated safety/helpfulness reward and a KL penalty to the SFT model (section 3.2.3)
side_by_side ppo $PYTHON train_ppo.py --preset "$PRESET" --init "$OUT/sft/model.pt" --rm-safety "$OUT/rm_safety/model.pt" \
  --rm-helpful "$OUT/rm_helpful/model.pt" --out "$OUT/ppo"

# 5. DPO on the same kind of preference pairs, no reward model (Rafailov et al., 2023)
side_by_side dpo $PYTHON train_dpo.py --preset "$PRESET" --init "$OUT/sft/model.pt" --out "$OUT/dpo"

# 6. Rejection-sampling fine-tuning: best of K samples by the reward models, then SFT on them (section 3.2.3)
side_by_side rs $PYTHON distill.py --mode rejection --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --rm-safety "$OUT/rm_safety/model.pt" --rm-helpful "$OUT/rm_helpful/model.pt" --out "$OUT/rs"

# 7. Safety context distillation: answers generated under a safety preprompt, kept where the safety RM
#    prefers them, distilled into the model without the preprompt (section 4.2.4)
side_by_side distill $PYTHON distill.py --mode context --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --rm-safety "$OUT/rm_safety/model.pt" --out "$OUT/distill"

join

# 8. Evaluation of every stage's checkpoint: gold judge, red-team vectors, false refusals, RM scores, KL to SFT
checkpoints=()
for name in base sft ppo dpo rs distill; do
  checkpoints+=("$name=$OUT/$name/model.pt")
done
fresh=1
if [[ -f $OUT/eval/metrics.json ]]; then
  fresh=0
  for name in base sft rm_safety rm_helpful ppo dpo rs distill; do
    [[ $OUT/$name/model.pt -nt $OUT/eval/metrics.json ]] && fresh=1
  done
fi
if [[ $fresh == 1 ]]; then
  $PYTHON evaluate.py --checkpoints "${checkpoints[@]}" --baseline sft --sft "$OUT/sft/model.pt" \
    --rm-safety "$OUT/rm_safety/model.pt" --rm-helpful "$OUT/rm_helpful/model.pt" --out "$OUT/eval"
else
  echo "== eval: reusing $OUT/eval/metrics.json (no checkpoint is newer)"
  $PYTHON -c "import json, sys, evaluate; print(evaluate.format_table(json.load(open(sys.argv[1]))))" \
    "$OUT/eval/metrics.json"
fi
echo "== done: $OUT/eval/metrics.md, generations.jsonl and plots"
