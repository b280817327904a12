#!/usr/bin/env bash
# Installs what jaxprune needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST package, a
# virtual environment in .venv, and jaxprune with its dependencies (add --dev for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="."
[ "${1:-}" = "--dev" ] && extras=".[dev]"

# Debian packages: the dataset always; with --dev also the headless browser that the tests of the
# kernel-selection page drive (chromium and its WebDriver).
debs=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${JAXPRUNE_FASHION_MNIST_DIR:-}" ]; then
  debs+=(dataset-fashion-mnist)
fi
if [ "${1:-}" = "--dev" ] && ! command -v chromedriver >/dev/null; then
  debs+=(chromium chromium-driver)
fi
if [ ${#debs[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "Installing the Debian packages ${debs[*]}..."
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${debs[@]}"
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
