"""A real text field for the dictation tests and bench: a Tk window that takes the keyboard focus.

    python scripts/textfield.py OUT    # needs $DISPLAY

After every change it writes the whole text to OUT (replaced atomically) and appends
"MONOTONIC_SECONDS LENGTH" to OUT.changes, so a test can wait for words and a bench can time them.
OUT exists (empty) once the window has the focus.
"""

from __future__ import annotations

import os
import sys
import time
import tkinter as tk


def main(out: str) -> None:
    root = tk.Tk()
    root.title("captiond test field")
    text = tk.Text(root, width=100, height=30)
    text.pack()
    changes = open(out + ".changes", "a", buffering=1)

    def save() -> None:
        content = text.get("1.0", "end-1c")
        with open(out + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(content)
        os.replace(out + ".tmp", out)
        changes.write(f"{time.monotonic():.4f} {len(content)}\n")

    def changed(_event: object) -> None:
        if text.edit_modified():  # resetting the flag below fires the event once more
            save()
            text.edit_modified(False)

    text.bind("<<Modified>>", changed)
    root.wait_visibility()
    root.focus_force()
    text.focus_set()
    root.update()
    save()
    root.mainloop()


if __name__ == "__main__":
    main(sys.argv[1])
