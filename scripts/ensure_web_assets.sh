#!/usr/bin/env bash
# Install the JavaScript the book serves itself (MathJax, reveal.js) from the npm registry into scripts/web/node_modules.
# Installs Debian's npm first when it is missing (as root, or through sudo). Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/web"
if [ -f node_modules/mathjax/es5/tex-mml-chtml.js ] && [ -f node_modules/reveal.js/dist/reveal.js ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq npm >/dev/null
fi
# Exact versions in package.json and neither package has dependencies, so no lock file is needed.
npm install --no-audit --no-fund --no-package-lock --loglevel=error
