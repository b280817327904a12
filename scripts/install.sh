#!/usr/bin/env bash
# Installs what jaxprune needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST package, a
# virtual environment in .venv, and jaxprune with its dependencies (add --dev for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="."
[ "${1:-}" = "--dev" ] && extras=".[dev]"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${JAXPRUNE_FASHION_MNIST_DIR:-}" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "Installing the Debian package dataset-fashion-mnist (real Fashion-MNIST, offline)..."
  $sudo apt-get update -q
  $sudo apt-get install -y -q dataset-fashion-mnist
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed${1:-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "$extras"
  touch "$stamp"
fi
