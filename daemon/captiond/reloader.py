"""SIGHUP: which changed keys a running daemon applies, and which wait for a restart."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .config import Config

LIVE_ASR_KEYS = ("asr.beam_size", "asr.partial_beam_size", "asr.partials", "asr.first_partial_s",
                 "asr.partial_interval_s", "asr.partial_share",
                 "asr.early_final",
                 "asr.partial_pad_s", "asr.stable_after_s", "asr.stable_from_s", "asr.carry_over_s", "asr.bind_finals")
"""asr keys the worker reads per decode; the others shape the loaded model or the queue."""
_LIVE_SECTIONS = ("gate", "log")
_NOT_THE_DAEMONS = ("dictation",)  # read by `captiond type`, so never a reason to restart the daemon
T = TypeVar("T")


@dataclass(frozen=True)
class Reload:
    """What re-reading the config changes."""

    config: Config
    """The running config with the applied keys changed."""
    applied: dict[str, Any]
    """section.key -> new value, applied now."""
    later: tuple[str, ...]
    """section.key names that changed but take effect only after a restart."""

    def touches(self, section: str) -> bool:
        """True when an applied key is in this section."""
        return any(k.startswith(section + ".") for k in self.applied)


def plan(old: Config, new: Config) -> Reload:
    """Compare the running config with a re-read one."""
    changed = {f"{section}.{key}": value
               for section in vars(new) if section not in _NOT_THE_DAEMONS
               for key, value in vars(getattr(new, section)).items()
               if getattr(getattr(old, section), key) != value}
    applied = {k: v for k, v in changed.items() if k.split(".")[0] in _LIVE_SECTIONS or k in LIVE_ASR_KEYS}
    asr = dataclasses.replace(old.asr, **{k.split(".")[1]: v for k, v in applied.items() if k.startswith("asr.")})
    config = dataclasses.replace(old, gate=new.gate, log=new.log, asr=asr)
    return Reload(config, applied, tuple(sorted(set(changed) - set(applied))))


class Handoff(Generic[T]):
    """A value handed from the event loop to a worker thread: the latest put wins and is taken once.

    A plain attribute read, used and cleared by the thread lost a put that came in between.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None

    def put(self, value: T) -> None:
        """Offer a value, replacing one not taken yet."""
        with self._lock:
            self._value = value

    def take(self) -> T | None:
        """The value offered since the last take, or None."""
        with self._lock:
            value, self._value = self._value, None
        return value
