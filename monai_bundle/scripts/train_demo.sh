#!/usr/bin/env bash
# Reproduces the bundle's DEMO weights (models/model.pt): synthetic phantoms only, not for
# clinical use.  Run from the repository root:
#     bash monai_bundle/scripts/train_demo.sh [WORKDIR]
# It generates phantoms, trains both FPAEs (eq. 3-4), then the classifier, fits the trust
# model (gate and calibration) on a separate validation draw, evaluates on the held-out
# phantoms and prints the SHA-256 of the weights and of the trust model.  Every step is seeded; CUDA is used
# when present (DEVICE=cpu forces the CPU; results then differ in the last digits).
# The phantom classes are balanced, so the class weights are equal; flips are off because
# a vertical flip moves the phantoms' lower-zone COVID-19 opacities to the upper zones.
# Knobs (environment): N phantoms per class, N_VAL validation phantoms per class, AE_EPOCHS,
# CLS_EPOCHS, CLS_LR, DEVICE, WORKERS, PYTHON.  The defaults are the ones that made the shipped weights.
set -euo pipefail
work=${1:-var/demo-training}
py=${PYTHON:-.venv/bin/python}
size=128
n=${N:-500}
n_val=${N_VAL:-300}
ae_epochs=${AE_EPOCHS:-10}
cls_epochs=${CLS_EPOCHS:-30}
cls_lr=${CLS_LR:-0.001}
device=${DEVICE:-auto}
workers=${WORKERS:-$(nproc)}
run() { "$py" -m monai.bundle run --bundle_root monai_bundle "$@"; }

"$py" -m monai_bundle.scripts.phantoms --out "$work/phantoms" --n "$n" --size 256 --seed 2026 \
    --splits train=0.75,test=0.25 --workers "$workers"
# The trust model's thresholds and temperature come from images neither the weights nor the
# gate's statistics saw: another draw of the same distribution.
"$py" -m monai_bundle.scripts.phantoms --out "$work/phantoms/validation" --n "$n_val" --size 256 \
    --seed 2027 --workers "$workers"
for ae in healthy pneumonia; do
    run --config_file monai_bundle/configs/train_autoencoder.json \
        --dataset_dir "$work/phantoms/train" --model_dir "$work/models" --ae_class "$ae" \
        --image_size "$size" --epochs "$ae_epochs" --batch_size 8 --learning_rate 0.001 \
        --device "$device" --seed 0
done
run --config_file monai_bundle/configs/train_classifier.json \
    --dataset_dir "$work/phantoms/train" --model_dir "$work/models" \
    --image_size "$size" --epochs "$cls_epochs" --batch_size 16 --learning_rate "$cls_lr" \
    --class_weights "[1.0, 1.0, 1.0]" --flip_prob 0.0 --device "$device" --seed 0
run --config_file "['monai_bundle/configs/inference.json','monai_bundle/configs/fit_trust.json']" \
    --dataset_dir "$work/phantoms/train" --validation_dataset_dir "$work/phantoms/validation" \
    --checkpoint "$work/models/model.pt" --trust_file "$work/models/trust.pt" \
    --image_size "$size"
run --config_file "['monai_bundle/configs/inference.json','monai_bundle/configs/evaluate.json']" \
    --dataset_dir "$work/phantoms/test" --checkpoint "$work/models/model.pt" \
    --trust_file "$work/models/trust.pt" --image_size "$size" --output_dir "$work/evaluation"
cp "$work/models/model.pt" "$work/models/trust.pt" monai_bundle/models/
sha256sum monai_bundle/models/model.pt monai_bundle/models/trust.pt
