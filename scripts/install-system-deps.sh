#!/bin/sh
# Debian/Ubuntu packages captiond needs: PortAudio headers and a compiler for PyAudio, Python's venv,
# PulseAudio for the virtual microphone that the demo (without a microphone) and the tests use, and
# tmux, in which the tests drive `captiond captions` like a person would, and chromium, in which they
# open the WebSocket captions page; alsa-utils for arecord (checking a microphone) and the spoken
# channel names that `make bench-heldout` plays; xvfb, xdotool and python3-tk for the dictation tests and
# bench (`captiond type` typing into a Tk text field in a virtual X server).
# Installs what is missing when run as root; otherwise prints the command to run.
set -eu
PACKAGES="gcc python3-dev python3-venv portaudio19-dev libasound2-plugins pulseaudio pulseaudio-utils tmux chromium alsa-utils xvfb xdotool python3-tk"
command -v dpkg-query >/dev/null 2>&1 || { echo "not a Debian/Ubuntu system: install the equivalents of: $PACKAGES" >&2; exit 0; }
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "captiond needs these Debian packages:$missing" >&2
    echo "install them with: sudo apt-get install -y$missing   (then run make again)" >&2
    exit 1
fi
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
