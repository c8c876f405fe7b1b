"""systemd units: offline verification, hardening scores, install-service."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from captiond.install import InstallError, exec_word
from conftest import ROOT

CAPTIOND = shutil.which("captiond") or os.path.join(os.path.dirname(sys.executable), "captiond")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def unit_copy(tmp_path, name):
    """The repo's unit with ExecStart pointing at this checkout's captiond (verify wants it to exist)."""
    text = (ROOT / "systemd" / name).read_text().replace("/usr/local/bin/captiond", CAPTIOND)
    path = tmp_path / "captiond.service"
    path.write_text(text)
    return path


def analyze(*args, user=False, tmp_path=None):
    env = {**os.environ}
    if user:
        env["XDG_RUNTIME_DIR"] = str(tmp_path)  # the user manager's lookup paths need one
        args = ("--user", *args)
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def exposure(result):
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert m, result.stdout + result.stderr
    return float(m.group(1))


def test_system_unit_verifies_clean_and_is_hardened(tmp_path):
    unit = unit_copy(tmp_path, "captiond-system.service")
    result = analyze("verify", str(unit), tmp_path=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == ""
    result = analyze("security", "--offline=true", "--threshold=25", str(unit), tmp_path=tmp_path)
    assert result.returncode == 0 and exposure(result) <= 2.5


def test_user_unit_verifies_clean_and_is_as_hardened_as_a_user_manager_allows(tmp_path):
    unit = unit_copy(tmp_path, "captiond.service")
    result = analyze("verify", str(unit), user=True, tmp_path=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == ""
    result = analyze("security", "--offline=true", str(unit), user=True, tmp_path=tmp_path)
    assert exposure(result) <= 4.0


@pytest.mark.parametrize("name", ["captiond.service", "captiond-system.service"])
def test_units_are_notify_services_with_watchdog(name):
    text = (ROOT / "systemd" / name).read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "OMP_WAIT_POLICY=PASSIVE", "ExecReload="):
        assert line in text, f"{name} lacks {line}"
    assert "MemoryDenyWriteExecute" not in text.split("[Service]")[1], "numba needs W+X memory"


def test_install_service_writes_unit_and_config(tmp_path):
    def run(kind):
        return subprocess.run([sys.executable, "-m", "captiond", "install-service", kind, "--root", str(tmp_path)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOME": "/home/u",
                                                                             "XDG_CONFIG_HOME": ""})

    result = run("--system")
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "etc/systemd/system/captiond.service").read_text()
    assert f'ExecStart="{os.path.realpath(CAPTIOND)}" run --config /etc/captiond/captiond.toml' in unit
    config = tmp_path / "etc/captiond/captiond.toml"
    assert config.read_text() == (ROOT / "config/captiond.toml").read_text()
    config.write_text("[gate]\nhangover_ms = 700\n")
    assert run("--system").returncode == 0 and config.read_text() == "[gate]\nhangover_ms = 700\n"
    assert "kept the existing" in run("--system").stdout

    assert run("--user").returncode == 0
    assert (tmp_path / "home/u/.config/systemd/user/captiond.service").is_file()
    assert (tmp_path / "home/u/.config/captiond/captiond.toml").is_file()


def test_install_service_where_it_cannot_write_says_what_to_do(tmp_path):
    # It printed a bare "[Errno 20] Not a directory: '…/systemd/user'".
    (tmp_path / "home/u/.config").mkdir(parents=True)
    (tmp_path / "home/u/.config/systemd").write_text("a file where a folder belongs")
    result = subprocess.run([sys.executable, "-m", "captiond", "install-service", "--user", "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOME": "/home/u",
                                                                           "XDG_CONFIG_HOME": ""})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"captiond: error: cannot write {tmp_path}/home/u/.config/systemd/user: Not a "
                                    "directory; it writes under $XDG_CONFIG_HOME (~/.config)"), result.stderr


def test_a_program_path_with_a_space_or_percent_sign_is_one_word_systemd_runs(tmp_path):
    # ExecStart was written unquoted: systemd split it at the space ("Command .../my is not executable")
    # and read "%" as a specifier, while install-service said it had succeeded.
    folder = tmp_path / "my tools 100%$"
    folder.mkdir()
    program = folder / "captiond"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit = tmp_path / "t.service"
    unit.write_text((ROOT / "systemd/captiond.service").read_text().replace("/usr/local/bin/captiond",
                                                                          exec_word(str(program))))
    verified = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert "not executable" not in verified.stderr and "special characters" not in verified.stderr, verified.stderr
    for bad in ('/opt/a"b/captiond', "/opt/it's/captiond", "/opt/a\\b/captiond", "/opt/a\nb/captiond"):
        with pytest.raises(InstallError, match="install captiond in another folder"):
            exec_word(bad)
