# CoroNet DICOM node: one image for the node, the workers and (in docker-compose.yml) the example
# Orthanc.  dcmtk provides echoscu for the health checks.  Not a medical device.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk orthanc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY dicom_node ./dicom_node
COPY worker ./worker
COPY monai_bundle ./monai_bundle
COPY configs ./configs
RUN pip install --no-cache-dir .

RUN useradd --system --uid 1000 --home-dir /var/lib/coronet coronet \
    && mkdir -p /var/lib/coronet/spool /var/lib/coronet/outbox /var/lib/orthanc/db \
    && chown -R coronet /var/lib/coronet
USER coronet

EXPOSE 11112 8480
CMD ["coronet", "--help"]
