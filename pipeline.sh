#!/usr/bin/env bash
# The Llama 2 safety pipeline in order, one command; it doubles as the table of contents of the method.
#
# Usage: pipeline.sh [--out DIR] [--preset NAME] [--jobs N] [--python CMD] [NAME=VALUE...] [-h | --help]
#
#   ./pipeline.sh                             # tiny preset on the embedded world, everything under out/
#   ./pipeline.sh --out runs/a --preset small
#   ./pipeline.sh OUT=runs/a PRESET=small     # the same, and so is: OUT=runs/a PRESET=small ./pipeline.sh
#
# Each setting is a flag (--out DIR or --out=DIR), a NAME=VALUE argument or an environment variable; an argument
# wins over the environment. Any other argument is an error (exit 2).
#   --out DIR      OUT=DIR       run folder (default out); a relative path is taken from the folder you run this in
#   --preset NAME  PRESET=NAME   tiny (default), small or 1b: every script's --preset
#   --jobs N       JOBS=N        stages run side by side after SFT (default 2 with 2 or more cores, else 1)
#   --python CMD   PYTHON=CMD    command that runs the scripts (default python)
#                  PROGRESS=S    seconds between the progress lines of side-by-side stages (default 30)
#   -h, --help                   print this and exit
# OMP_NUM_THREADS (environment only) sets the threads per stage; the comment on threads in this script says how.
#
# Each stage writes OUT/<stage>/ (model.pt, config.json, metrics.jsonl). A stage whose model.pt exists is reused;
# one that was interrupted (its .running marker is still there) continues with --resume. Delete a stage's folder
# to train it again. The evaluation reruns whenever a checkpoint is newer than OUT/eval/metrics.json. The last
# lines, also after a failure, say which stages were trained now, reused or are missing, and which of the
# evaluation's files (metrics.json, metrics.md, generations.jsonl, plots) exist.
set -euo pipefail
caller=$PWD
here=$(cd "$(dirname "$0")" && pwd)

usage() {  # the header above, without the comment marks
  sed -n '2,/^set -euo pipefail$/p' "$here/$(basename "$0")" | sed -e '$d' -e 's/^# \{0,1\}//'
}

usage_error() {  # one line on stderr, exit 2 (the scripts' convention for a user error)
  echo "pipeline.sh: $* (see pipeline.sh --help)" >&2
  exit 2
}

while (( $# > 0 )); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --out | --preset | --jobs | --python)
      [[ $# -ge 2 && -n $2 && $2 != -* ]] || usage_error "$1 needs a value"
      flag=${1#--}
      printf -v "${flag^^}" %s "$2"
      shift 2 ;;
    --out=* | --preset=* | --jobs=* | --python=*)
      flag=${1%%=*}
      flag=${flag#--}
      printf -v "${flag^^}" %s "${1#*=}"
      shift ;;
    OUT=* | PRESET=* | JOBS=* | PYTHON=* | PROGRESS=*)
      printf -v "${1%%=*}" %s "${1#*=}"
      shift ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
OUT=${OUT:-out}
PRESET=${PRESET:-tiny}
PYTHON=${PYTHON:-python}
PROGRESS=${PROGRESS:-30}
[[ $OUT == /* || $caller == "$here" ]] || OUT=$caller/$OUT
[[ $PRESET =~ ^(tiny|small|1b)$ ]] || usage_error "--preset/PRESET must be tiny, small or 1b, not '$PRESET'"
[[ $PROGRESS =~ ^[1-9][0-9]*$ ]] || usage_error "PROGRESS must be a positive number of seconds, not '$PROGRESS'"
# Threads and cores: the tiny models' small matrix products gain little from a second thread and lose a lot
# when anything else holds the other core (evaluating 100 prompts on a loaded 2-core machine: 10 s with one
# thread, 59 s with two). So the stages that need only the SFT model and the RMs run JOBS at a time (default:
# 2 on a machine with 2 or more cores), one thread each, their output in OUT/logs/; the base model and SFT,
# which run alone, use every core. Set OMP_NUM_THREADS and JOBS to override, e.g. JOBS=1 for PRESET=small on a GPU.
JOBS=${JOBS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || usage_error "--jobs/JOBS must be a positive integer, not '$JOBS'"
ALONE_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$here"
mkdir -p "$OUT"

started="" reused="" evaluation="not run"  # for the summary: stages trained (or resumed) now, stages reused

finished() {  # finished NAME: OUT/NAME/model.pt is the checkpoint of a run that ended
  [[ -f $OUT/$1/model.pt && ! -f $OUT/$1/.running ]]
}

stage() {  # stage NAME COMMAND...: run COMMAND unless OUT/NAME/model.pt is already a finished checkpoint
  local name=$1 dir=$OUT/$1
  shift
  local extra=()
  if finished "$name"; then
    echo "== $name: reusing $dir/model.pt"
    reused+=" $name"
    return
  fi
  started+=" $name"
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
  if (( JOBS == 1 )) || finished "$1"; then  # a reused stage says so here and leaves its log as it was
    stage "$@"
    return
  fi
  local log=$OUT/logs/$1.log
  mkdir -p "$OUT/logs"
  echo "== $1: started, log in $log"
  started+=" $1"  # stage() notes it too, but in the background shell
  if [[ -f $OUT/$1/model.pt ]]; then
    stage "$@" >> "$log" 2>&1 &  # resuming: the interrupted run's log goes on
  else
    stage "$@" > "$log" 2>&1 &
  fi
  pids+=($!) names+=("$1")
  if (( ${#pids[@]} >= JOBS )); then
    join
  fi
}

latest() {  # latest LOG: LOG's last progress line (tqdm redraws its bar after a \r), or nothing
  tail -c 4096 "$1" 2>/dev/null | tr '\r' '\n' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' \
    | grep -v -e '^$' -e '^== ' | tail -n 1 || true
}

join() {  # wait for the stages started side by side, with their progress every PROGRESS s; stop if one failed
  local i line failed=0 next=$((SECONDS + PROGRESS))
  while (( ${#pids[@]} > 0 )); do
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null && continue
      if wait "${pids[$i]}"; then
        tr '\r' '\n' < "$OUT/logs/${names[$i]}.log" | grep "^== ${names[$i]}: done" | tail -n 1 || true
      else
        echo "== ${names[$i]}: failed, see $OUT/logs/${names[$i]}.log" >&2
        failed=1
      fi
      unset "pids[$i]" "names[$i]"
    done
    (( ${#pids[@]} > 0 )) || break
    sleep 0.1
    if (( SECONDS >= next )); then
      for i in "${!pids[@]}"; do
        line=$(latest "$OUT/logs/${names[$i]}.log")
        echo "== ${names[$i]}: ${line:-running, nothing in its log yet}"
      done
      next=$((SECONDS + PROGRESS))
    fi
  done
  pids=() names=()
  (( failed == 0 )) || exit 1
}

summary() {  # summary STATUS: each stage's checkpoint and the evaluation's files, as they are on disk now
  set +e  # an exit trap: report what there is, whatever fails
  local name state f written="" absent="" plots=""
  if (( $1 == 0 )); then echo "== done: $OUT"; else echo "== stopped (exit $1): $OUT"; fi
  for name in base sft rm_safety rm_helpful ppo dpo rs distill; do
    if [[ " $reused " == *" $name "* ]]; then
      state="reused"
    elif [[ -f $OUT/$name/model.pt && -f $OUT/$name/.running ]]; then
      state="interrupted: rerun to resume from its checkpoint"
    elif [[ ! -f $OUT/$name/model.pt ]]; then
      state="missing"
    elif [[ " $started " == *" $name "* ]]; then
      state="trained now"
    else
      state="from an earlier run (not reached this time)"
    fi
    printf '==   %-11s %s\n' "$name" "$state"
  done
  for f in metrics.json metrics.md generations.jsonl; do
    if [[ -f $OUT/eval/$f ]]; then written+=", $f"; else absent+=", $f"; fi
  done
  for f in "$OUT"/eval/*.png; do
    [[ -f $f ]] || continue
    plots+=", ${f##*/}"
    [[ $f -ot $OUT/eval/metrics.json ]] && plots+=" (older than metrics.json)"
  done
  printf '==   %-11s %s\n' eval "$evaluation"
  written+=$plots
  [[ -z $written ]] || echo "==   written in $OUT/eval/: ${written#, }"
  [[ -z $absent ]] || echo "==   not written: ${absent#, }"
  if [[ -f $OUT/eval/metrics.json && -z $plots ]]; then
    if ! $PYTHON -c "import matplotlib" 2>/dev/null; then
      echo "==   no plots: matplotlib is not installed (pip install matplotlib)"
    else
      echo "==   no plots in $OUT/eval/ (evaluate.py says why when it runs; --no-plots skips them)"
    fi
  fi
}
trap 'summary $?' EXIT

stop() {  # stop SIG: let the stages running side by side save their step, then stop (a rerun resumes them)
  # A training script saves a checkpoint and exits on SIGINT or SIGTERM. A terminal's Ctrl-C reaches every
  # stage by itself; a SIGTERM sent to this script is passed on to the side-by-side stages here.
  trap - INT TERM
  local pid
  if [[ $1 == TERM ]]; then
    for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null; done
  fi
  wait
  exit $((128 + $(kill -l "$1")))
}
trap 'stop INT' INT
trap 'stop TERM' TERM

# 0. Pre-training data audit (section 4.1): personal data, pronouns and identity terms in the base corpus
$PYTHON evaluate.py --audit > "$OUT/audit.txt"
echo "== audit: $OUT/audit.txt"

# 1. Base model: next-token pre-training on the world's unaligned corpus (section 2)
OMP_NUM_THREADS=$ALONE_THREADS stage base $PYTHON train_sft.py --stage base --preset "$PRESET" --out "$OUT/base"

# 2. Supervised fine-tuning on safety demonstrations, loss on answer tokens only (section 3.1)
OMP_NUM_THREADS=$ALONE_THREADS stage sft $PYTHON train_sft.py --stage sft --preset "$PRESET" \
  --init "$OUT/base/model.pt" --out "$OUT/sft"

# 3. Reward models: binary ranking loss with margin, one per objective (section 3.2.2)
side_by_side rm_safety $PYTHON train_rm.py --objective safety --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --out "$OUT/rm_safety"
side_by_side rm_helpful $PYTHON train_rm.py --objective helpfulness --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --out "$OUT/rm_helpful"
join  # the stages below read both reward models

# 4. PPO with the gated safety/helpfulness reward and a KL penalty to the SFT model (section 3.2.3)
side_by_side ppo $PYTHON train_ppo.py --preset "$PRESET" --init "$OUT/sft/model.pt" \
  --rm-safety "$OUT/rm_safety/model.pt" --rm-helpful "$OUT/rm_helpful/model.pt" --out "$OUT/ppo"

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
fresh=1 overwrite=()
if [[ -f $OUT/eval/metrics.json ]]; then
  fresh=0 overwrite=(--overwrite)  # evaluate.py keeps an existing metrics.json unless told to replace it
  for name in base sft rm_safety rm_helpful ppo dpo rs distill; do
    [[ $OUT/$name/model.pt -nt $OUT/eval/metrics.json ]] && fresh=1
  done
fi
if [[ $fresh == 1 ]]; then
  $PYTHON evaluate.py --checkpoints "${checkpoints[@]}" --baseline sft --sft "$OUT/sft/model.pt" \
    --rm-safety "$OUT/rm_safety/model.pt" --rm-helpful "$OUT/rm_helpful/model.pt" --out "$OUT/eval" "${overwrite[@]}"
  evaluation="evaluated now"
else
  echo "== eval: reusing $OUT/eval/metrics.json (no checkpoint is newer)"
  evaluation="reused (no checkpoint is newer than metrics.json)"
  $PYTHON -c "import json, sys, evaluate; print(evaluate.format_table(json.load(open(sys.argv[1]))))" \
    "$OUT/eval/metrics.json"
fi
