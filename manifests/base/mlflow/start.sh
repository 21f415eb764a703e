#!/bin/sh
# MLflow tracking server: runs and registry in Postgres, artifacts in S3 (MinIO), proxied by the server.
# MLFLOW_BASIC_AUTH=true turns on MLflow's basic-auth app (users in a second Postgres database).
set -eu
backend="postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/${POSTGRES_DB}"
set -- --backend-store-uri "$backend" --artifacts-destination "s3://${MLFLOW_ARTIFACTS_BUCKET}" --serve-artifacts \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-2}"
if [ "${MLFLOW_BASIC_AUTH:-false}" = "true" ]; then
  cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${backend}_auth
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
  set -- "$@" --app-name basic-auth
else
  # Without basic auth the server must not see the auth secrets (nothing would use them).
  unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD
fi
exec mlflow server "$@"
