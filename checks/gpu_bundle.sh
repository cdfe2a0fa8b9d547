#!/usr/bin/env bash
# Prepares, on this machine, what the GPU checks need on a GPU machine that has torch but neither the network nor
# open_clip (see BENCHMARKS.md, "GPU"): the wheels open_clip needs beyond that machine's packages, in .whl/, and the
# first 4,096 challenge images, in .gpu-data/Scene/ (both git-ignored; about 20 MB in all).
#   bash checks/gpu_bundle.sh [PATH/TO/Scene]
set -euo pipefail
cd "$(dirname "$0")/.."
scene=${1:-../shared/data/scene/Scene}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.14 natsort==8.4.0
rm -rf .gpu-data && mkdir -p .gpu-data/Scene/0
cp "$scene/classes.json" .gpu-data/Scene/
for i in $(seq 0 4095); do cp "$scene/0/$i.jpg" .gpu-data/Scene/0/; done
echo "wheels: $(ls .whl | tr '\n' ' ')"
echo "images: $(ls .gpu-data/Scene/0 | wc -l) in .gpu-data/Scene ($(du -sh .gpu-data | cut -f1))"
