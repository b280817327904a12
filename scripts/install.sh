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
# Optional: oneDNN and a C++ compiler for the oneDNN convolutions (jaxprune.ops.onednn). A
# system without them keeps XLA's convolutions, so their absence does not stop the install.
# Only where apt-get exists: elsewhere (macOS, other distributions) they are simply skipped.
optional_debs=()
if command -v apt-get >/dev/null; then
  if [ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ]; then
    optional_debs+=(libdnnl-dev)
  fi
  if ! command -v g++ >/dev/null; then
    optional_debs+=(g++)
  fi
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if [ ${#debs[@]} -gt 0 ]; then
  $sudo apt-get update -q
elif [ ${#optional_debs[@]} -gt 0 ]; then
  $sudo apt-get update -q || optional_debs=()
fi
if [ ${#debs[@]} -gt 0 ]; then
  echo "Installing the Debian packages ${debs[*]}..."
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${debs[@]}"
fi
if [ ${#optional_debs[@]} -gt 0 ]; then
  echo "Installing the optional Debian packages ${optional_debs[*]}..."
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${optional_debs[@]}" ||
    echo "Could not install ${optional_debs[*]}: convolutions will use XLA's own kernels."
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
# The oneDNN convolution library (rebuilt only when its source changed); a failed build leaves
# XLA's convolutions in place.
# (Called as a function: `python -m` would import the module twice, once through jaxprune.ops.)
.venv/bin/python -c 'import sys; from jaxprune.ops import onednn_build; sys.exit(onednn_build.main([]))' ||
  echo "oneDNN convolutions not built: convolutions will use XLA's own kernels."
