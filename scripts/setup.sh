#!/usr/bin/env bash
# Sets up this checkout for the tests on a fresh Debian machine: the Debian packages the tests drive
# (chromium and its driver for the playground's browser test, curl for the curl test, a C++ compiler for
# torch.compile's CPU backend in the compiled-step tests), then a virtual
# environment .venv with torch and the package with every extra the tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is pinned: 2.13.0 is served here as a CPU build; an unpinned torch pulls GBs of CUDA packages.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,bench,serve,ray]"
