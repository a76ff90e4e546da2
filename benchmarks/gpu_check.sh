#!/bin/bash
# Issue 15's GPU checks for the `device` tool, in parts that each end inside one 600 s call (every
# step has its own timeout, shortened as the 580 s mark nears; a step cut short writes "rc 124" and
# the part goes on). First run `bash benchmarks/gpu_prepare.sh` here, then call the tool with
# carry [".whl", ".gpu"] and
#   bash benchmarks/gpu_check.sh a      (timeout_s 590)
# and, if device time is left, `... b`. Logs come back in $OUT (steps.log first; under 8 files).
# A dry run of the plumbing on a CPU: OUT=/tmp/out CHECK_ARGS="--set device=cpu --set compile=false --epochs 1
# -m kvit_pico_patch4_28" BENCH_DEVICE=cpu with a stub `nvidia-smi` on PATH.
#   a: the gpu preset's 5-fold cv as a user runs it (on an H200, all five folds share the GPU, and
#      the notice saying so is logged), submit and score, under bf16
#      and then amp = fp16 (--set amp=fp16), with nvidia-smi utilisation sampled through each cv and each fold's
#      first epoch (start-up, compiling) against its later ones.
#   b: `kaggle-vit bench --device cuda --preset gpu` (bare compiled step, the cv loop, their ratio,
#      NVML utilisation), then 4 folds x 4 epochs with 1, 2 and 4 folds sharing the GPU.
set -u
PART=${1:?which part: a or b}
T0=$(date +%s)
L=$OUT/steps.log
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
cap() {  # cap N RESERVE: N seconds, or less so that RESERVE seconds stay before the 580 s mark
  local left=$(( 580 - ($(date +%s) - T0) - $2 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
since() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
smi_start() { nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$OUT/smi.csv" & SMI=$!; }
smi_stop() {  # mean utilisation over the samples, and over the busy ones (start-up is mostly idle)
  kill "$SMI"; python3 -c "
v = [int(l) for l in open('$OUT/smi.csv') if l.strip().isdigit()]
busy = [x for x in v if x]
print('  nvidia-smi utilisation: mean %.0f%% over %d samples of 0.5 s; %.0f%% over the %d busy ones'
      % (sum(v) / max(1, len(v)), len(v), sum(busy) / max(1, len(busy)), len(busy)))" | tee -a "$L"; }

stamp "setup (part $PART)"
[ -d .site/albumentations ] || python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl > /dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target .site . > /dev/null 2>&1
export PYTHONPATH=$PWD/.site PATH=$PWD/.site/bin:$PATH KAGGLE_VIT_CACHE=$PWD/.gpu NO_ALBUMENTATIONS_UPDATE=1
{ git log -1 --format='commit %h' 2>/dev/null; nvidia-smi -L; echo "cores $(nproc)"
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } >> "$L"
mkdir -p .gpuwork && cd .gpuwork
[ -f data/digit-recognizer/train.csv ] || timeout 90 kaggle-vit data digit-recognizer --offline > /dev/null 2>&1
stamp "data ready (rc $?)"

epoch_one() {  # each fold's first epoch (start-up and compiling) against its median later epoch, in s
  python3 - "$1" <<'PY' | tee -a "$L"
import csv, statistics, sys
from pathlib import Path
for h in sorted(Path(sys.argv[1]).glob("fold*/history.csv")):
    s = [float(r["seconds"]) for r in csv.DictReader(h.open())]
    if not s:
        continue
    later = f"later epochs {statistics.median(s[1:]):.1f} s (median of {len(s) - 1})" if s[1:] else "no later epoch"
    print(f"  {h.parent.name}: epoch 1 {s[0]:.1f} s, {later}")
PY
}

cv_submit() {  # cv_submit NAME [cv options]: the gpu preset's 5 folds as a user runs them (an H200: all at once), then submit and score
  local name=$1; shift
  stamp "cv $name"; smi_start; local start=$(date +%s.%N)
  timeout "$(cap 240 50)" kaggle-vit cv --folds 5 --preset gpu --quiet --run-dir "runs/$name" "$@" ${CHECK_ARGS:-} \
    > "$OUT/$name.log" 2>&1
  local rc=$? cv=$(since "$start"); smi_stop; start=$(date +%s.%N)
  timeout "$(cap 30 20)" kaggle-vit submit "runs/$name" --output "sub_$name.csv" >> "$OUT/$name.log" 2>&1
  echo "  $name: cv $cv s (rc $rc), submit $(since "$start") s" | tee -a "$L"
  grep -h "at once" "$OUT/$name.log" | head -1 >> "$L"
  timeout "$(cap 30 0)" kaggle-vit score "sub_$name.csv" --run-dir "runs/$name" >> "$OUT/$name.log" 2>&1
  grep -h accuracy "$OUT/$name.log" | tail -3 >> "$L"
  grep -h '"images_per_s"\|"amp"\|"train_seconds"' "runs/$name"/fold*/result.json 2>/dev/null | tr -d ' \n' >> "$L"; echo >> "$L"
  epoch_one "runs/$name"
}

if [ "$PART" = a ]; then
  cv_submit bf16
  cv_submit fp16 --set amp=fp16
elif [ "$PART" = b ]; then
  stamp bench; smi_start
  timeout "$(cap 180 0)" kaggle-vit bench --device ${BENCH_DEVICE:-cuda} --preset gpu --rounds 3 > "$OUT/bench.log" 2>&1; echo "  bench rc $?" >> "$L"; smi_stop
  tail -25 "$OUT/bench.log" >> "$L"
  for J in 1 2 4; do
    stamp "jobs $J"; smi_start; S=$(date +%s.%N)
    timeout "$(cap 110 0)" kaggle-vit cv --folds 5 --fold 1,2,3,4 --epochs 4 --preset gpu --jobs $J --quiet --run-dir "runs/jobs$J" \
      ${CHECK_ARGS:-} > "$OUT/jobs$J.log" 2>&1
    RC=$?; echo "  $J at once: 4 folds x 4 epochs in $(since "$S") s (rc $RC)" | tee -a "$L"; smi_stop
    grep -h '"images_per_s"' "runs/jobs$J"/fold*/result.json 2>/dev/null | tr -d ' \n' >> "$L"; echo >> "$L"
    epoch_one "runs/jobs$J"
  done
fi
stamp done
