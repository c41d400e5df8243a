#!/usr/bin/env bash
# The web page end to end in headless Chromium: installs Debian's chromium (and Node) when
# missing, playwright-core from package-lock.json, then runs identify.test.mjs (about 15 s).
set -euo pipefail
cd "$(dirname "$0")"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "browser test: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
# Built already by `cargo test --release`; a no-op then.
(cd ../.. && cargo build --release --locked --bin finprint)
node identify.test.mjs
