#!/usr/bin/env bash
# Reproduces the bundle's DEMO weights (models/model.pt): synthetic phantoms only, not for
# clinical use.  Run from the repository root:  bash monai_bundle/scripts/train_demo.sh [WORKDIR]
# It generates phantoms, trains both FPAEs (eq. 3-4), then the classifier, evaluates on the
# held-out phantoms and prints the SHA-256 of the weights.  Every step is seeded.
# The phantom classes are balanced, so the class weights are equal; flips are off because
# a vertical flip moves the phantoms' lower-zone COVID-19 opacities to the upper zones.
set -euo pipefail
work=${1:-var/demo-training}
py=${PYTHON:-.venv/bin/python}
size=128
run() { "$py" -m monai.bundle run --bundle_root monai_bundle "$@"; }

"$py" -m monai_bundle.scripts.phantoms --out "$work/phantoms" --n 160 --size 256 --seed 2026 \
    --splits train=0.75,test=0.25
for ae in healthy pneumonia; do
    run --config_file monai_bundle/configs/train_autoencoder.json \
        --dataset_dir "$work/phantoms/train" --model_dir "$work/models" --ae_class "$ae" \
        --image_size "$size" --epochs 8 --batch_size 8 --seed 0
done
run --config_file monai_bundle/configs/train_classifier.json \
    --dataset_dir "$work/phantoms/train" --model_dir "$work/models" \
    --image_size "$size" --epochs 10 --batch_size 16 --learning_rate 0.0003 \
    --class_weights "[1.0, 1.0, 1.0]" --flip_prob 0.0 --seed 0
run --config_file "['monai_bundle/configs/inference.json','monai_bundle/configs/evaluate.json']" \
    --dataset_dir "$work/phantoms/test" --checkpoint "$work/models/model.pt" \
    --image_size "$size" --output_dir "$work/evaluation"
cp "$work/models/model.pt" monai_bundle/models/model.pt
sha256sum monai_bundle/models/model.pt
