"""`captiond install-service`: put the unit file and the config where systemd and captiond look for them."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import xdg_home

SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The source checkout this package runs from (editable installs, `make` set-ups)."""


class InstallError(RuntimeError):
    """The service cannot be installed; the message says why and what to do."""


@dataclass(frozen=True)
class Plan:
    """Where one kind of service installation puts its files."""

    unit_source: Path
    unit_target: Path
    config_target: Path
    next_steps: str


def _executable() -> str:
    found = shutil.which("captiond") or str(Path(sys.executable).with_name("captiond"))
    if not Path(found).is_file():
        raise InstallError("cannot find the captiond program to run; install the package first (pipx install .)")
    return str(Path(found).resolve())


def exec_word(exe: str) -> str:
    """The program's path as ExecStart's first word: quoted (a space split it), its % doubled (systemd's
    specifiers). InstallError for characters systemd takes in no program name (quotes, backslashes,
    control characters)."""
    if any(c in exe for c in "\"\\'") or not exe.isprintable():
        raise InstallError(f"systemd cannot run a program whose path has a quote, a backslash or a control "
                           f"character: {exe!r}; install captiond in another folder (e.g. python3 -m venv /opt/captiond)")
    return '"' + exe.replace("%", "%%") + '"'


def plan(system: bool, root: Path = Path("/")) -> Plan:
    """The files for a user (--user) or system (--system) installation, under root."""
    units = SOURCE_ROOT / "systemd"
    if system:
        return Plan(units / "captiond-system.service", root / "etc/systemd/system/captiond.service",
                    root / "etc/captiond/captiond.toml",
                    "systemctl daemon-reload && systemctl enable --now captiond\n"
                    "journalctl -u captiond -f        # its log;  captiond captions --set "
                    "server.socket=/run/captiond/captiond.sock  # as a member of server.group")
    config_home = xdg_home("XDG_CONFIG_HOME", ".config")
    if root != Path("/"):
        config_home = root / config_home.relative_to("/")
    return Plan(units / "captiond.service", config_home / "systemd/user/captiond.service",
                config_home / "captiond/captiond.toml",
                "systemctl --user daemon-reload && systemctl --user enable --now captiond\n"
                "journalctl --user -u captiond -f  # its log;  captiond captions  # live captions")


def install(system: bool, root: Path = Path("/")) -> list[str]:
    """Write the unit (ExecStart pointing at this captiond) and, if absent, the config; return what was done."""
    p = plan(system, root)
    if not p.unit_source.is_file():
        raise InstallError(f"unit file {p.unit_source} not found: install-service works from a source checkout "
                           "(git clone, then make setup)")
    done = []
    if system and root == Path("/"):
        if os.geteuid() != 0:
            raise InstallError("--system needs root: sudo captiond install-service --system")
        try:
            pwd.getpwnam("captiond")
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--groups", "audio", "--home-dir",
                            "/var/lib/captiond", "--no-create-home", "--shell", "/usr/sbin/nologin", "captiond"],
                           check=True)
            done.append("created system user captiond (groups: captiond, audio)")
    exe = _executable()
    if system and exe.startswith(("/home/", "/root/")):
        raise InstallError(f"the system service cannot run {exe}: ProtectHome= hides /home and /root from it; "
                           "install captiond outside them, e.g. python3 -m venv /opt/captiond && "
                           "/opt/captiond/bin/pip install . && sudo /opt/captiond/bin/captiond install-service --system")
    unit = p.unit_source.read_text().replace("/usr/local/bin/captiond", exec_word(exe))
    with _writing(system):
        p.unit_target.parent.mkdir(parents=True, exist_ok=True)
        p.unit_target.write_text(unit)
    done.append(f"wrote {p.unit_target} (ExecStart={exe} …)")
    if p.config_target.exists():
        done.append(f"kept the existing {p.config_target}")
    else:
        config = (SOURCE_ROOT / "config" / "captiond.toml").read_bytes()
        with _writing(system):
            p.config_target.parent.mkdir(parents=True, exist_ok=True)
            p.config_target.write_bytes(config)
        done.append(f"wrote {p.config_target} (every key with its default)")
    done.append("next:\n" + p.next_steps)
    return done


@contextlib.contextmanager
def _writing(system: bool) -> Iterator[None]:
    """An OSError writing the unit or the config as an InstallError that says what to do (it was a
    bare "[Errno 30] Read-only file system: …")."""
    try:
        yield
    except OSError as exc:
        if not system:
            fix = "it writes under $XDG_CONFIG_HOME (~/.config): make that a writable folder"
        elif os.geteuid() != 0:
            fix = "run it as root (sudo)"
        else:
            fix = "the folder is not writable here (a read-only /etc?)"
        where = f" {exc.filename}" if exc.filename else ""
        raise InstallError(f"cannot write{where}: {exc.strerror or exc}; {fix}") from None
