#!/bin/sh
# Buckets for MLflow artifacts and the DVC remote, and a non-root access key limited to them.
# Credentials come from the environment (deploy/.env); nothing is echoed.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing local/mlflow-artifacts local/dvc-remote
cat > /tmp/wanda-policy.json <<'JSON'
{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"],
  "Resource": ["arn:aws:s3:::mlflow-artifacts", "arn:aws:s3:::mlflow-artifacts/*",
               "arn:aws:s3:::dvc-remote", "arn:aws:s3:::dvc-remote/*"]}]}
JSON
mc admin policy create local wanda-pipeline /tmp/wanda-policy.json >/dev/null 2>&1 || true
# `user add` on an existing user sets its secret: re-running after a rotation applies the new one.
mc admin user add local "$WANDA_S3_ACCESS_KEY_ID" "$WANDA_S3_SECRET_ACCESS_KEY" >/dev/null
mc admin policy attach local wanda-pipeline --user "$WANDA_S3_ACCESS_KEY_ID" >/dev/null 2>&1 || true
