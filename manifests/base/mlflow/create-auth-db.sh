#!/bin/sh
# Runs once, when Postgres initializes an empty data directory: the database of MLflow's basic-auth users.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -c "CREATE DATABASE ${POSTGRES_DB}_auth"
