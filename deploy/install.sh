#!/usr/bin/env bash
# Install riha-node into ./.venv on this machine (Debian/Ubuntu, Python 3.11+).
#   bash deploy/install.sh          the node and its Python dependencies (CPU build of torch)
#   bash deploy/install.sh --test   also the real peers the tests start (dcmtk, dicom3tools, Orthanc, PostgreSQL,
#                                   a Java runtime for METEOR) and the test extras
# The container images in deploy/ run these same steps, so CI exercises them.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[ "${1:-}" = "--test" ] && with_test=1

if [ "$with_test" = 1 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends \
    dcmtk dicom3tools orthanc postgresql default-jre-headless openssl > /dev/null
fi

python3 -m venv .venv
# torch and torchvision are pinned as a pair: the CPU wheels of this release load torchvision's operators.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
if [ "$with_test" = 1 ]; then
  .venv/bin/pip install -q -e '.[test]'
else
  .venv/bin/pip install -q -e .
fi
echo "riha-node installed in $(pwd)/.venv: run .venv/bin/riha-node --help"
