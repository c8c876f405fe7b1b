#!/bin/sh
# `make demo`: the daemon with live captions in this terminal. With no microphone, the bundled speech
# sample is played, in a loop, through a virtual microphone (PulseAudio), so the same daemon and the
# same PyAudio capture path run as they would with a real microphone.
set -eu
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
DEMO=$(mktemp -d "${TMPDIR:-/tmp}/captiond-demo.XXXXXX")
SOCK="$DEMO/captiond.sock"
DAEMON_PID="" VMIC_PID="" PLAYER_PID=""

cleanup() {
    set +e  # under -e, a child's non-zero status from wait ended the script before its last line
    [ -n "$PLAYER_PID" ] && kill "$PLAYER_PID" 2>/dev/null
    [ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    [ -n "$VMIC_PID" ] && kill "$VMIC_PID" 2>/dev/null && wait "$VMIC_PID" 2>/dev/null
    echo "demo stopped; its transcript log and daemon log are in $DEMO"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if "$PY" -m captiond devices >/dev/null 2>&1; then
    SAMPLE=""
    echo "Recording from your default microphone: say something. (Ctrl-C stops the demo.)"
else
    SAMPLE=$("$PY" -c 'import captiond, pathlib; print(pathlib.Path(captiond.__file__).parent / "samples" / "demo.wav")')
    echo "No microphone found: playing the bundled speech sample ($(basename "$SAMPLE"), real speech, 45 s, looped)"
    echo "through a virtual microphone, so the daemon records it exactly as it would a real one. (Ctrl-C stops.)"
    "$PY" scripts/vmic.py >"$DEMO/vmic.env" 2>"$DEMO/vmic.log" &
    VMIC_PID=$!
    i=0
    until grep -q '^export' "$DEMO/vmic.env" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 150 ] && { echo "virtual microphone did not start:"; cat "$DEMO/vmic.log"; exit 1; }
        sleep 0.1
    done
    eval "$(cat "$DEMO/vmic.env")"
fi

"$PY" -m captiond run --source mic --set "server.socket=$SOCK" --set "log.path=$DEMO/transcript.log" \
    2>"$DEMO/daemon.log" &
DAEMON_PID=$!
i=0
until grep -q "ready in" "$DEMO/daemon.log" 2>/dev/null; do
    if ! kill -0 "$DAEMON_PID" 2>/dev/null || [ $i -gt 600 ]; then
        echo "the daemon did not start:"; cat "$DEMO/daemon.log"; DAEMON_PID=""; exit 1
    fi
    i=$((i + 1)); sleep 0.1
done
echo "daemon ready (log: $DEMO/daemon.log, transcript: $DEMO/transcript.log)"

if [ -n "$SAMPLE" ]; then
    # Played once the captions are connected: an utterance that begins while no subscriber wants
    # partials gets none.
    (for _ in $(seq 100); do
         "$PY" -m captiond status --json --set "server.socket=$SOCK" 2>/dev/null | grep -qE '"subscribers": ([2-9]|[1-9][0-9])' && break  # itself and the captions
         sleep 0.1
     done
     while true; do paplay -d vsink "$SAMPLE" || exit 0; sleep 3; done) &
    PLAYER_PID=$!
fi
"$PY" -m captiond captions --set "server.socket=$SOCK"
