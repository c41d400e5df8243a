#!/usr/bin/env bash
# Nyala flanks (../shared/data/nyala-train): see tools/real_set.sh.
exec bash "$(dirname "$0")/real_set.sh" nyala "$@"
