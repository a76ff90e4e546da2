#!/bin/bash
# Run here, on the development machine, before `benchmarks/gpu_check.sh` goes to the `device` tool:
# the GPU machine cannot download, and its image lacks albumentations. This puts the wheels it needs
# into .whl/ and the real MNIST pickle into .gpu/ (both git-ignored; carry [".whl", ".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16
cp "$(python3 -c 'from kaggle_vit.data.fetch import mnist_pickle_path; print(mnist_pickle_path())')" .gpu/  # SHA-256 checked
echo "ready: $(ls .whl | wc -l) wheels ($(du -sh .whl | cut -f1)), $(du -sh .gpu/mnist.pkl.gz | cut -f1) MNIST pickle"
