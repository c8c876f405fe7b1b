"""A virtual microphone for machines with no sound card: PulseAudio in user space, fed with paplay.

Used by the tests, the benchmarks and `make demo`. PortAudio reaches it through ALSA's pulse
plugin, so the daemon records from it with the same PyAudio code as from a real microphone.

    python scripts/vmic.py        # start one, print the environment to use, run until Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PA_CONFIG = """\
load-module module-native-protocol-unix
load-module module-null-sink sink_name=vsink rate=16000 channels=1
set-default-sink vsink
set-default-source vsink.monitor
"""

NEEDED = ("pulseaudio", "pactl", "paplay")


def missing_tools() -> list[str]:
    """The PulseAudio programs this machine lacks (Debian: pulseaudio pulseaudio-utils libasound2-plugins)."""
    return [tool for tool in NEEDED if shutil.which(tool) is None]


class VirtualMic:
    """A private PulseAudio server whose default source carries whatever is played into its sink."""

    def __init__(self) -> None:
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="captiond-vmic-"))
        self.runtime_dir.chmod(0o700)
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(self.runtime_dir),
                    "PULSE_SERVER": f"unix:{self.runtime_dir}/pulse/native"}
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "VirtualMic":
        """Start PulseAudio and wait until it answers."""
        if missing_tools():
            raise RuntimeError(f"virtual microphone needs {', '.join(missing_tools())} "
                               "(apt-get install pulseaudio pulseaudio-utils libasound2-plugins)")
        config = self.runtime_dir / "vmic.pa"
        config.write_text(_PA_CONFIG)
        with open(self.runtime_dir / "pulseaudio.log", "wb") as log:
            self._proc = subprocess.Popen(
                ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "-n", "-F", str(config)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while subprocess.run(["pactl", "info"], env=self.env, capture_output=True).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PulseAudio did not start; see {self.runtime_dir}/pulseaudio.log")
            time.sleep(0.1)
        return self

    def play(self, wav: str | os.PathLike) -> subprocess.Popen:
        """Play a file into the microphone in real time; wait() on the result to know when it ends."""
        return subprocess.Popen(["paplay", "-d", "vsink", str(wav)], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop PulseAudio (to a recording program this looks like the device going away; start() brings it back)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "VirtualMic":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


if __name__ == "__main__":
    # Blocked so that sigwait() receives them and the with-block stops PulseAudio on the way out.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with VirtualMic() as mic:
        print(f"export XDG_RUNTIME_DIR={mic.runtime_dir} PULSE_SERVER={mic.env['PULSE_SERVER']}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    sys.exit(0)
