"""A virtual X server (Xvfb) with a real text field in it, for the dictation tests and bench.

    with XServer() as x:
        field = x.field(tmp / "field.txt")     # a focused Tk text window
        subprocess.run(["xdotool", "type", "hi"], env=x.env)
        field.wait_for(lambda text: text == "hi")
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

NEEDED = ("Xvfb", "xdotool")
_FIELD = Path(__file__).with_name("textfield.py")


def missing_tools() -> list[str]:
    """What this machine lacks for the X tests (Debian: xvfb xdotool python3-tk)."""
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if _tk_python() is None:
        missing.append("tkinter")
    return missing


def _tk_python() -> str | None:
    """A Python that has tkinter: ours, else Debian's (python3-tk)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if Path(python).exists() and subprocess.run([python, "-c", "import tkinter"], capture_output=True).returncode == 0:
            return python
    return None


class TextField:
    """A Tk text window with the keyboard focus; its text is read back from a file it rewrites."""

    def __init__(self, path: Path, env: dict, timeout: float = 30.0) -> None:
        self.path = path
        self.proc = subprocess.Popen([_tk_python(), str(_FIELD), str(path)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the text field did not come up (exit {self.proc.returncode})")
            time.sleep(0.05)

    @property
    def text(self) -> str:
        """What the field holds now."""
        return self.path.read_text(encoding="utf-8")

    def changes(self) -> list[tuple[float, int]]:
        """(time.monotonic(), length) after each change so far."""
        lines = Path(str(self.path) + ".changes").read_text().split("\n")
        return [(float(t), int(n)) for t, n in (line.split() for line in lines if line.strip())]

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 60.0) -> str:
        """The field's text once pred holds for it, else AssertionError with what it holds."""
        deadline = time.monotonic() + timeout
        while not pred(text := self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"the field holds {text!r}")
            time.sleep(0.05)
        return text

    def close(self) -> None:
        """Close the window."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class XServer:
    """Xvfb on a free display; `env` points programs at it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.env: dict = {}
        self.display = ""

    def start(self, timeout: float = 30.0) -> "XServer":
        """Start Xvfb and wait until it has picked its display."""
        if missing_tools():
            raise RuntimeError(f"the X tests need {', '.join(missing_tools())} "
                               "(apt-get install xvfb xdotool python3-tk)")
        read, write = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                                     pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(write)
        try:
            number = b""
            deadline = time.monotonic() + timeout
            while not number.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read], [], [], left)[0] or not (chunk := os.read(read, 16)):
                    self.stop()
                    raise RuntimeError("Xvfb did not start")
                number += chunk
        finally:
            os.close(read)
        self.display = f":{int(number)}"
        self.env = {**os.environ, "DISPLAY": self.display}
        self.env.pop("WAYLAND_DISPLAY", None)
        return self

    def field(self, path: Path) -> TextField:
        """Open a text field window with the keyboard focus."""
        return TextField(path, self.env)

    def stop(self) -> None:
        """Stop Xvfb."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "XServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
