#!/bin/sh
# docker-compose.yaml's `minio-init` (image minio/mc): creates the landing and lake buckets on MinIO and the
# Airflow service account with least privilege -- read-only on landing (raw data with PHI is never modified),
# read/write on lake. Idempotent: it runs at every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${IMAGING_S3_ACCESS_KEY:?}" "${IMAGING_S3_SECRET_KEY:?}"
LANDING="${IMAGING_LANDING_BUCKET:-imaging-landing}"
LAKE="${IMAGING_LAKE_BUCKET:-imaging-lake}"
ENDPOINT="${MINIO_ENDPOINT:-http://minio:9000}"

mc alias set local "${ENDPOINT}" "${MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD}"
mc mb --ignore-existing "local/${LANDING}" "local/${LAKE}"

cat > /tmp/imaging-airflow-policy.json <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "ListBoth", "Effect": "Allow",
     "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
     "Resource": ["arn:aws:s3:::${LANDING}", "arn:aws:s3:::${LAKE}"]},
    {"Sid": "ReadLanding", "Effect": "Allow",
     "Action": ["s3:GetObject"],
     "Resource": ["arn:aws:s3:::${LANDING}/*"]},
    {"Sid": "WriteLakeUploads", "Effect": "Allow",
     "Action": ["s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::${LAKE}"]},
    {"Sid": "WriteLake", "Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::${LAKE}/*"]}
  ]
}
EOF
mc admin policy create local imaging-airflow /tmp/imaging-airflow-policy.json
mc admin user add local "${IMAGING_S3_ACCESS_KEY}" "${IMAGING_S3_SECRET_KEY}"
mc admin policy attach local imaging-airflow --user "${IMAGING_S3_ACCESS_KEY}" 2>/dev/null \
  || echo "policy imaging-airflow already attached to ${IMAGING_S3_ACCESS_KEY}"
# the DICOM receiver (dicom-receiver): adds objects to landing, reads them back (is it there yet?), deletes nothing
cat > /tmp/imaging-receiver-policy.json <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "ListLanding", "Effect": "Allow",
     "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
     "Resource": ["arn:aws:s3:::${LANDING}"]},
    {"Sid": "AddToLanding", "Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::${LANDING}/*"]}
  ]
}
EOF
if [ -n "${IMAGING_RECEIVER_S3_ACCESS_KEY:-}" ]; then
  mc admin policy create local imaging-receiver /tmp/imaging-receiver-policy.json
  mc admin user add local "${IMAGING_RECEIVER_S3_ACCESS_KEY}" "${IMAGING_RECEIVER_S3_SECRET_KEY:?}"
  mc admin policy attach local imaging-receiver --user "${IMAGING_RECEIVER_S3_ACCESS_KEY}" 2>/dev/null \
    || echo "policy imaging-receiver already attached to ${IMAGING_RECEIVER_S3_ACCESS_KEY}"
fi
echo "buckets s3://${LANDING} (read-only for Airflow) and s3://${LAKE} (read/write) ready"
