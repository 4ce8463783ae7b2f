# CoroNet DICOM node: one image for the node, the workers and (in docker-compose.yml) the example
# Orthanc.  dcmtk provides echoscu for the health checks.  Not a medical device.
#
# torch comes from the PyTorch index named by TORCH_INDEX, before the project, so that pip does
# not pull the CUDA build from PyPI: the default is the CPU build (the node, the CPU worker,
# Orthanc); the GPU worker's image is built with a CUDA index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t coronet-dicom-node:0.1.0-cuda .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk orthanc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md LICENSE ./
COPY dicom_node ./dicom_node
COPY worker ./worker
COPY monai_bundle ./monai_bundle
COPY configs ./configs
# demo: pydicom-data, the sample radiograph of `coronet demo send`.
RUN pip install --no-cache-dir ".[demo]"

RUN useradd --system --uid 1000 --home-dir /var/lib/coronet coronet \
    && mkdir -p /var/lib/coronet/spool /var/lib/coronet/outbox /var/lib/coronet/fetch-cache \
       /var/lib/orthanc/db \
    && chown -R coronet /var/lib/coronet
USER coronet

EXPOSE 11112 8480
CMD ["coronet", "--help"]
