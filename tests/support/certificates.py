"""The one certificate maker: self-signed certificates for TLS tests, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate and its key (PEM); the certificate is its own CA."""

    cert: Path
    key: Path


def make_certificate(folder: Path, common_name: str = "localhost") -> Certificate:
    """A P-256 certificate for ``common_name``, also valid for 127.0.0.1, for one day."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{common_name}.pem", folder / f"{common_name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={common_name}"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", f"subjectAltName=DNS:{common_name},IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Certificate(cert, key)
