#!/usr/bin/env bash
# Belugas seen from above (../shared/data/beluga): see tools/real_set.sh.
exec bash "$(dirname "$0")/real_set.sh" beluga "$@"
