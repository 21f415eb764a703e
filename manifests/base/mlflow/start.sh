#!/bin/sh
# MLflow tracking server: runs and registry in Postgres, artifacts in S3 (MinIO), proxied by the server.
# MLFLOW_BASIC_AUTH=true turns on MLflow's basic-auth app (users in a second Postgres database).
# The Postgres URI (with its password) comes in MLFLOW_BACKEND_STORE_URI, which `mlflow server` reads for
# --backend-store-uri: it never appears on a command line (ps, /proc/*/cmdline).
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set by the Deployment from Secret sharegpt4v-postgres}"
unset POSTGRES_PASSWORD  # only inside MLFLOW_BACKEND_STORE_URI from here on
set -- --artifacts-destination "s3://${MLFLOW_ARTIFACTS_BUCKET}" --serve-artifacts \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-2}"
if [ "${MLFLOW_BASIC_AUTH:-false}" = "true" ]; then
  umask 077  # the auth config holds the database password: readable by this user only
  cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_BACKEND_STORE_URI}_auth
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
  set -- "$@" --app-name basic-auth
else
  # Without basic auth the server must not see the auth secrets (nothing would use them).
  unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD
fi
exec mlflow server "$@"
