"""`docker compose --profile demo up imaging-demo-data`: synthetic studies into the MinIO landing bucket.

Synthesizes every specialty (with bad inputs, which the pipeline must quarantine) and uploads them under
``<specialty>/`` with the MinIO root account -- the Airflow account is read-only on landing, as a PACS export
or DICOM router would have its own write-only credential. The ground truth (``_truth/``) stays out of the bucket.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import boto3

    from imaging_tasks.cli import main as cli

    studies = os.environ.get("DEMO_STUDIES", "2")
    bucket = os.environ.get("IMAGING_LANDING_BUCKET", "imaging-landing")
    s3 = boto3.client("s3", endpoint_url=os.environ.get("MINIO_ENDPOINT", "http://minio:9000"),
                      aws_access_key_id=os.environ["MINIO_ROOT_USER"],
                      aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"], region_name="us-east-1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rc = cli(["synth", "--specialty", "all", "--out", str(out), "--studies", studies, "--seed", "0",
                  "--bad-inputs"])
        if rc:
            return rc
        files = [p for p in sorted(out.rglob("*")) if p.is_file() and "_truth" not in p.relative_to(out).parts]
        for path in files:
            s3.upload_file(str(path), bucket, path.relative_to(out).as_posix())
    print(f"uploaded {len(files)} file(s) to s3://{bucket}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
