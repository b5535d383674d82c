#!/usr/bin/env bash
# schemathesis against `edgellm serve` (the demo model) for a while: every operation of the
# server's own /openapi.json, generated valid and invalid requests, every phase (examples,
# coverage, fuzzing, stateful). Passes when no response is a 5xx (check not_a_server_error).
# The bounded version runs in CI: tests/test_server_load.py.
#
#   scripts/serve_fuzz.sh [SECONDS] [PORT]      (default 600 s, port 8093)
set -euo pipefail
SECONDS_MAX="${1:-600}"
PORT="${2:-8093}"
PY="${PYTHON:-python}"
ST="$(dirname "$(command -v "$PY")")/st"
DEMO="$("$PY" -c 'from edgellm.cli import demo_model_path; print(demo_model_path())')"
LOG="$(mktemp -t edgellm-serve-fuzz.XXXXXX.log)"

"$PY" -m edgellm.cli serve "$DEMO" --port "$PORT" --queue-size 64 --log-level warning \
    >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.2
done

status=0
"$ST" run "http://127.0.0.1:$PORT/openapi.json" --checks not_a_server_error \
    --max-time "$SECONDS_MAX" --workers 4 --suppress-health-check all --request-timeout 120 \
    || status=$?
echo "--- /health after the run"
curl -s "http://127.0.0.1:$PORT/health"; echo
echo "--- server log (errors): $LOG"
grep -iE "error|traceback" "$LOG" | head -20 || true
exit $status
