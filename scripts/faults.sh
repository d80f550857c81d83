#!/usr/bin/env bash
# The fault suite of RELIABILITY.md, full length: every fault injected into a real local
# stack under unique-query load, then a 10-minute soak (SIMQ_SOAK_SECS, default 600) with a
# rollout in the middle; the results replace the generated part of RELIABILITY.md.
# It starts its own test cluster (as scripts/test.sh, which runs the same suite with a
# 60 s soak) and refuses to run beside scripts/up.sh's stack.
#
#   scripts/faults.sh          about 20 minutes once the build is cached
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
{
export SIMQ_SOAK_SECS="${SIMQ_SOAK_SECS:-600}"
export SIMQ_RELIABILITY_MD="$SIMQ_ROOT/RELIABILITY.md"
log "fault suite with a ${SIMQ_SOAK_SECS} s soak; results into $SIMQ_RELIABILITY_MD"
exec "$SIMQ_ROOT/scripts/test.sh" -- every_fault_of_reliability_md
}; exit
