"""End to end in headless Chromium: the captions page shows what the daemon hears through the virtual
microphone, and its microphone button streams the browser's own (fake) microphone to /listen."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, ROOT, Daemon, clip, read_wav, silence, write_wav

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium on these machines: no sandbox as root, and no background networking (the network is closed).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


MEDIA_RECORDER_JS = """async () => {
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const ws = new WebSocket(`ws://${location.host}/listen?encoding=webm`);
  const finals = [];
  ws.onmessage = (m) => { const ev = JSON.parse(m.data); if (ev.type === "final") finals.push(ev.text); };
  await new Promise((resolve) => { ws.onopen = resolve; });
  const recorder = new MediaRecorder(stream, {mimeType: "audio/webm;codecs=opus"});
  recorder.ondataavailable = (e) => ws.send(e.data);
  recorder.start(250);
  await new Promise((resolve) => setTimeout(resolve, 7000));
  recorder.stop();
  await new Promise((resolve) => setTimeout(resolve, 500));
  ws.send(JSON.stringify({type: "CloseStream"}));
  await new Promise((resolve) => { ws.onclose = resolve; });
  return finals;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_words(name: str) -> list[str]:
    """Longer words of a clip's reference, which even a small model gets right."""
    words = [w.strip(".,!?;:\"'").lower() for w in clip(name)["text"].split()]
    return [w for w in words if len(w) >= 5]


def test_page_shows_daemon_captions_and_streams_the_browsers_microphone(vmic, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make system-deps installs it as root)")
    port = free_port()
    daemon = Daemon(tmp_path, "--source", "mic", "--set", "websocket.enabled=true", "--set", f"websocket.port={port}",
                    env=vmic.env)
    spoken = write_wav(tmp_path / "spoken.wav", np.concatenate(
        [silence(0.5), read_wav(CORPUS / "mfa_thoughts.wav"), silence(1.5)]))
    # Chromium's fake capture device plays this file, looped, as the browser's microphone.
    browser_mic = write_wav(tmp_path / "browser-mic.wav", np.concatenate(
        [silence(1.0), read_wav(CORPUS / "ps_forever.wav"), silence(2.0)]))
    try:
        daemon.connect()
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                *FLAGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={browser_mic}"])
            # bypass_csp lets Playwright evaluate its waiting predicates; the page itself runs under its CSP.
            page = browser.new_page(bypass_csp=True, viewport={"width": 1100, "height": 520})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('listening')",
                                   timeout=20_000)
            assert vmic.play(spoken).wait(60) == 0
            page.wait_for_function("document.getElementById('events-captions').textContent.length > 0",
                                   timeout=60_000)
            shown = page.text_content("#events-captions").lower()
            assert any(w in shown for w in key_words("mfa_thoughts.wav")), shown

            page.click("#mic-button")
            page.wait_for_function("document.getElementById('mine-captions').textContent.length > 0",
                                   timeout=60_000)
            mine = page.text_content("#mine-captions").lower()
            assert any(w in mine for w in key_words("ps_forever.wav")), mine
            # The browser's speech went to its own session only, not to the daemon's captions.
            assert not any(w in page.text_content("#events-captions").lower() for w in key_words("ps_forever.wav"))
            shot = os.environ.get("CAPTIOND_SCREENSHOT")
            page.screenshot(path=str(ROOT / shot) if shot else str(tmp_path / "page.png"))
            page.click("#mic-button")  # Stop: sends CloseStream
            page.wait_for_function("document.getElementById('mic-button').textContent === 'Use my microphone'")
            # The other encoding, as browsers make it: MediaRecorder's WebM/Opus chunks, sent as they come.
            recorded = " ".join(page.evaluate(MEDIA_RECORDER_JS)).lower()
            assert any(w in recorded for w in key_words("ps_forever.wav")), recorded
            browser.close()
            assert not errors
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert "live session from" in daemon.stderr and "ended (CloseStream)" in daemon.stderr
