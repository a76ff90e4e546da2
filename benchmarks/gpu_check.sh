#!/bin/bash
# The GPU checks of issue 15 in one script for the `device` tool (every step has a timeout; logs
# and nvidia-smi samples go to $OUT, a few files only). Before calling it, as FIELD-NOTES.md says:
# download the albumentations wheels into .whl/ and copy ~/.cache/kaggle-vit/mnist.pkl.gz into
# .gpu/ (both git-ignored), then run `bash benchmarks/gpu_check.sh` with carry [".whl", ".gpu"].
# It measures: bench with CUDA graphs, 5-fold CV + submit with five folds at once, fold 1 with CUDA
# graphs, and 4 folds x 4 epochs with 2 and with 4 folds sharing the GPU.
set -u
T0=$(date +%s)
L=$OUT/steps.log
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $L; }
el() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
util() { kill $SMI; python3 -c "
v=[int(l) for l in open('$OUT/smi.csv') if l.strip().isdigit()]
print('  nvidia-smi utilization: mean %.0f%% over %d samples (0.5 s), mean while busy %.0f%%' % (sum(v)/max(1,len(v)), len(v), sum(x for x in v if x)/max(1,len([x for x in v if x]))))" | tee -a $L; }
smi() { nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > $OUT/smi.csv & SMI=$!; }
stamp setup
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl > /dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .site . > /dev/null 2>&1
export PYTHONPATH=$PWD/.site PATH=$PWD/.site/bin:$PATH KAGGLE_VIT_CACHE=$PWD/.gpu NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi -L >> $L; nproc >> $L
mkdir -p w && cd w
timeout 60 kaggle-vit data digit-recognizer --offline > /dev/null 2>&1
stamp bench-reduce-overhead
timeout 150 kaggle-vit bench --device cuda --preset gpu --compile-mode reduce-overhead --rounds 2 > $OUT/bench_ro.log 2>&1; echo "rc $?" >> $OUT/bench_ro.log
stamp cv-jobs5; smi; S=$(date +%s.%N)
timeout 200 kaggle-vit cv --folds 5 --preset gpu --jobs 5 --quiet --run-dir runs/j5 > $OUT/cv_j5.log 2>&1; echo "rc $?" >> $OUT/cv_j5.log
C=$(el $S); S2=$(date +%s.%N); timeout 60 kaggle-vit submit runs/j5 >> $OUT/cv_j5.log 2>&1; echo "cv $C s, submit $(el $S2) s" | tee -a $L; util
kaggle-vit score submission.csv >> $OUT/cv_j5.log 2>&1; tail -2 $OUT/cv_j5.log >> $L
stamp fold1-reduce-overhead; smi; S=$(date +%s.%N)
timeout 120 kaggle-vit cv --folds 5 --fold 1 --preset gpu --compile-mode reduce-overhead --jobs 1 --quiet --run-dir runs/ro > $OUT/ro.log 2>&1; echo "rc $?" >> $OUT/ro.log
echo "fold 1, CUDA graphs: $(el $S) s" | tee -a $L; util
for J in 2 4; do
  stamp jobs$J; smi; S=$(date +%s.%N)
  timeout 100 kaggle-vit cv --folds 5 --fold 1,2,3,4 --epochs 4 --preset gpu --jobs $J --quiet --run-dir runs/jobs$J > $OUT/jobs$J.log 2>&1
  echo "jobs $J: 4 folds x 4 epochs $(el $S) s (rc $?)" | tee -a $L; util
  grep -h images_per_s runs/jobs$J/fold*/result.json | tr -d '\n' >> $L; echo >> $L
done
echo "bf16 fold 1 history (jobs 5 run):" >> $L; cut -d, -f1,4,5,8 runs/j5/fold1/history.csv | tail -4 >> $L
stamp done
