#!/usr/bin/env bash
# Submit a training run to a Ray cluster as a job, follow its logs, and exit with its status.
#
#   RAY_ADDRESS=http://HEAD:8265 scripts/submit_ray_job.sh +experiment=NAME launcher.num_workers=4 \
#       launcher.use_gpu=true paths.log_dir=/shared/outputs data.index=s3://bucket/ds/dataset.json
#
# This repository is the job's working directory (files .gitignore names stay behind), so the
# cluster runs this code; its Python must have our dependencies installed (the image in
# scripts/deploy/Dockerfile does). The job's driver composes the config once and starts
# launcher=ray there. Ray 2.60 clusters use token auth: the token is read from
# ~/.ray/auth_token (or RAY_AUTH_TOKEN). paths.log_dir should be storage that outlives the job.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# `ray job stop` sends SIGTERM, then kills the job after RAY_JOB_STOP_WAIT_TIME_S (Ray's default
# 3 s): too short for the workers to reach a step and report a checkpoint (train/midepoch.py).
wait_s="${RAY_JOB_STOP_WAIT_TIME_S:-45}"
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
    --runtime-env-json "{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"$wait_s\"}}" \
    -- python -m train launcher=ray "$@"
