#!/usr/bin/env bash
# Right-whale heads (../shared/data/rightwhale): see tools/real_set.sh.
exec bash "$(dirname "$0")/real_set.sh" rightwhale "$@"
