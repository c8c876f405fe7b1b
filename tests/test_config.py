import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from captiond import config as cfgmod
from captiond.config import Config, ConfigError, load, parse_override
from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_loaded_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config, path = load(None, [])
    assert config == Config() and path is None


@pytest.mark.parametrize("text, key", [
    ("[gate]\nhangover = 3\n", "gate.hangover"),
    ("[nosuch]\nx = 1\n", "nosuch"),
    ("[gate]\nhangover_ms = 'long'\n", "gate.hangover_ms"),
    ("[gate]\nvad_aggressiveness = 7\n", "gate.vad_aggressiveness"),
    ("[gate]\nstart_ms = 30\nstart_window_ms = 60\n", "gate.start_window_ms"),  # could never open
    ("[gate]\nmin_sustain_ms = 290\n", "gate.min_sustain_ms"),  # more than the start window can hold
    ("[asr]\nbeam_size = 0\n", "asr.beam_size"),
    ("[server]\nmode = '0644x'\n", "server.mode"),
    ("[server]\nmode = '0400'\n", "server.mode"),
    ("[audio]\nsource = 'speaker'\n", "audio.source"),
    ("[log]\nenabled = 'yes'\n", "log.enabled"),
    ("gate = 3\n", "gate"),
    ('[log]\npath = "a\\u0000b"\n', "log.path"),  # the OS takes no NUL in a path: a traceback before
    ('[server]\nsocket = "/tmp/\\u0000.sock"\n', "server.socket"),
    ("[wyoming]\nuri = 'tcp://[::1'\n", "wyoming.uri"),  # urlsplit's ValueError was a traceback
    ("[asr]\nremote_url = 'http://[::1'\n", "asr.remote_url"),
    ("[asr]\nremote_url = 'http://gpu-box/my models/v1'\n", "asr.remote_url"),  # the space split the request line
    ("[asr]\nremote_url = 'http://gpu-box/modèles/v1'\n", "asr.remote_url"),  # a traceback on every request
    ("[gate]\nmax_utterance_s = 1" + "0" * 400 + "\n", "gate.max_utterance_s"),  # float() overflowed: a traceback
    ("[log]\npath = '~no-such-user-here/t.log'\n", "log.path"),  # expanduser's RuntimeError, where used
    # check-config said "config OK" to these; run refused them.
    ("[server]\nsocket = '/tmp/" + "s" * 120 + ".sock'\n", "server.socket"),
    ("[wyoming]\nuri = 'unix:///tmp/" + "s" * 120 + ".sock'\n", "wyoming.uri"),
    # int(mode, 8) took spaces, underscores, a 0o prefix and other scripts' digits.
    ("[server]\nmode = ' 0600 '\n", "server.mode"),
    ("[server]\nmode = '0_600'\n", "server.mode"),
    ("[server]\nmode = '0o660'\n", "server.mode"),
    ("[server]\nmode = '\u0660\u0666\u0660\u0660'\n", "server.mode"),
    # A hexadecimal number too long to quote: repr() of it raised ValueError, a traceback.
    ("[audio]\nring_seconds = 0x" + "f" * 5000 + "\n", "audio.ring_seconds"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert f"{key}:" in str(err.value)


def test_toml_nested_too_deeply_is_invalid_toml_not_a_traceback(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML: arrays or tables nested too deeply"):
        load(write(tmp_path, "[audio]\nsource = " + "[" * 5000 + "]" * 5000 + "\n"))


def test_invalid_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[gate\n"))
    # tomllib's own ValueError for a number of more than 4300 digits was a traceback (exit 1; a
    # SIGHUP logged one), where every other config problem is one line.
    with pytest.raises(ConfigError, match="a number has thousands of digits"):
        load(write(tmp_path, "[audio]\nring_seconds = " + "9" * 5000 + "\n"))
    with pytest.raises(ConfigError, match="audio.ring_seconds: must be a number"):  # --set reads it as text
        load(None, ["audio.ring_seconds=" + "9" * 5000])
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_config_that_is_a_directory_or_fifo_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)
    fifo = tmp_path / "captiond.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # and it does not block on the FIFO
        load(fifo)


def test_set_overrides_file_values_and_reads_toml_types(tmp_path):
    path = write(tmp_path, "[gate]\nhangover_ms = 900\n")
    config, _ = load(path, ["gate.hangover_ms=600", "server.socket=./x.sock", "asr.partial_interval_s=0.7",
                            "gate.feature_check=false"])
    assert config.gate.hangover_ms == 600
    assert config.server.socket == "./x.sock"
    assert config.asr.partial_interval_s == 0.7
    assert config.gate.feature_check is False


def test_set_needs_section_key_value():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("hangover_ms=3")
    with pytest.raises(ConfigError, match="gate.nope"):
        load(None, ["gate.nope=1"])


def test_group_widens_default_mode():
    assert cfgmod.ServerConfig().file_mode == 0o600
    assert cfgmod.ServerConfig(group="audio").file_mode == 0o660


def test_shipped_config_file_lists_every_key_with_its_default():
    shipped = tomllib.loads((ROOT / "config" / "captiond.toml").read_text())
    defaults = Config()
    for section in fields(Config):
        table = shipped.get(section.name)
        assert table is not None, f"config/captiond.toml lacks [{section.name}]"
        for field in fields(getattr(defaults, section.name)):
            assert field.name in table, f"config/captiond.toml lacks {section.name}.{field.name}"
            assert table[field.name] == getattr(getattr(defaults, section.name), field.name), \
                f"{section.name}.{field.name}: file and code disagree on the default"
    assert load(ROOT / "config" / "captiond.toml")[0] == defaults


def test_default_paths_follow_systemd_and_xdg(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/captiond")
    assert str(cfgmod.socket_path(cfgmod.ServerConfig())) == "/run/captiond/captiond.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert str(cfgmod.socket_path(cfgmod.ServerConfig())) == "/run/user/1000/captiond/captiond.sock"
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.local/state")
    monkeypatch.delenv("LOGS_DIRECTORY", raising=False)
    assert str(cfgmod.log_path(cfgmod.LogConfig())) == "/home/u/.local/state/captiond/transcript.log"
    assert str(cfgmod.socket_path(cfgmod.ServerConfig(socket="/tmp/a.sock"))) == "/tmp/a.sock"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from captiond.config import from_dict  # noqa: E402

_keys = st.sampled_from(["audio", "gate", "asr", "server", "log", "other"])
_names = st.sampled_from(["source", "hangover_ms", "beam_size", "mode", "max_bytes", "model", "enabled",
                          "vad_aggressiveness", "partial_interval_s", "socket", "nope"])
_values = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20) \
    | st.lists(st.integers(), max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, st.dictionaries(_names, _values.filter(lambda v: v is not None), max_size=4)
                       | _values, max_size=4))
def test_any_parsed_toml_gives_a_config_or_a_named_error(data):
    try:
        config = from_dict(data)
    except ConfigError as exc:
        first = str(exc).removeprefix(f"{str(exc).split()[0]} errors: ")  # several: each named
        assert ":" in first and first.split(":")[0].split(".")[0] in data
    else:
        assert isinstance(config, Config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_file_text_gives_a_config_or_a_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as exc:
        assert str(exc)


def test_prompt_and_hotwords_must_be_text_the_decoder_can_take():
    # A --set value that is not UTF-8 reaches Python as lone surrogates (surrogateescape).
    for key in ("asr.hotwords", "asr.initial_prompt"):
        with pytest.raises(ConfigError, match=f"{key}: is not valid Unicode"):
            load(None, [f"{key}=caf\udce9"])


def test_language_must_be_a_whisper_code_or_auto():
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert cfgmod.WHISPER_LANGUAGES == set(_LANGUAGE_CODES)
    for bad in ('""', "zz", "english"):
        with pytest.raises(ConfigError, match="asr.language: .* is not a Whisper language code"):
            load(None, [f"asr.language={bad}"])
    assert load(None, ["asr.language=auto"])[0].asr.language == "auto"
    assert load(None, ["asr.language=de"])[0].asr.language == "de"


def test_a_config_file_of_more_than_a_mebibyte_is_refused_unread(tmp_path):
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"# " + b"x" * (1 << 20) + b"\n[gate]\nhangover_ms = 700\n")
    with pytest.raises(ConfigError, match="huge.toml: more than 1 MiB"):
        load(huge)


def test_languages_to_detect_among_are_whisper_codes_and_need_auto():
    asr = load(None, ["asr.language=auto", "asr.languages= EN, es,"])[0].asr
    assert asr.candidate_languages == {"en", "es"}
    with pytest.raises(ConfigError, match="asr.languages: 'xx' is not a Whisper language code"):
        load(None, ["asr.language=auto", "asr.languages=en,xx"])
    with pytest.raises(ConfigError, match="asr.languages: only applies to asr.language = auto"):
        load(None, ["asr.language=en", "asr.languages=en,es"])


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'[asr]\ninitial_prompt = "caf\xe9"\n')  # Latin-1
    with pytest.raises(ConfigError, match=r"c.toml: not UTF-8 text \(byte \d+ is 0xe9\); save it as UTF-8"):
        load(path)
    cli = subprocess.run([sys.executable, "-m", "captiond", "check-config", "--config", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip().splitlines() == [f"captiond: error: {path}: not UTF-8 text (byte 27 is 0xe9); save it as UTF-8"]


def test_no_home_folder_is_a_one_line_error_naming_what_to_set(monkeypatch):
    # Containers run with arbitrary user ids and no HOME: Path.home() raised RuntimeError in every command.
    import pwd

    from captiond.config import LogConfig, default_config_paths, log_path
    from captiond.models import cache_dir

    def no_entry(uid):
        raise KeyError(uid)

    for var in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "LOGS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")  # a user's daemon, not the system one
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert default_config_paths() == [Path("/etc/captiond/captiond.toml")]
    with pytest.raises(ConfigError, match=r"cannot tell the home folder .*: set HOME or XDG_STATE_HOME$"):
        log_path(LogConfig())
    with pytest.raises(ConfigError, match="set HOME or XDG_CACHE_HOME"):
        cache_dir({})
    assert cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/captiond/models")


def test_a_default_config_path_that_is_a_directory_is_an_error_not_passed_over(tmp_path, monkeypatch):
    # Passed over, the defaults (or /etc's file) were used and the user's settings silently lost.
    (tmp_path / "captiond.toml").mkdir()
    monkeypatch.setattr(cfgmod, "default_config_paths", lambda: [tmp_path / "captiond.toml", tmp_path / "etc.toml"])
    with pytest.raises(ConfigError, match="captiond.toml: not a regular file"):
        load(None, [])


def test_every_mistake_is_named_at_once_and_a_file_of_junk_keys_makes_a_short_message():
    with pytest.raises(ConfigError) as err:
        cfgmod.from_dict({"asr": {"beam_size": "x", "beam": 5}, "gate": {"start_ms": 1}, "logs": {}})
    said = str(err.value)
    assert said.startswith("4 errors: ") and "asr.beam: unknown key;" in said and "asr.beam_size: must be a whole" in said
    assert "gate.start_ms: must be at least" in said and "logs: unknown table" in said
    with pytest.raises(ConfigError) as err:
        cfgmod.from_dict({"asr": {f"k{i}": 1 for i in range(100_000)}, **{f"t{i}": {} for i in range(1000)}})
    said = str(err.value)
    assert len(said) < 2000 and "asr.k9, and 99990 more: unknown keys" in said and "; and 991 more" in said


@pytest.mark.parametrize("data", [
    {"audio": {"source": "x" * 1_000_000}},  # a value quoted in its error
    {"asr": {"model": ["m"] * 100_000}},  # a mistyped value
    {"asr": {"k" * 1_000_000: 1}},  # an unknown key
    {"t" * 1_000_000: {}},  # an unknown table
    {"websocket": {"origins": "x" * 1_000_000}},  # one of several checked values
])
def test_an_error_quotes_a_huge_name_or_value_clipped(data):
    # The whole value was quoted: a 1 MB line in the journal and on the terminal.
    with pytest.raises(ConfigError) as err:
        cfgmod.from_dict(data)
    said = str(err.value)
    assert len(said) < 1000 and "…" in said


def test_a_reload_reads_the_file_once_it_has_settled_and_refuses_an_empty_one(tmp_path, monkeypatch):
    # An attack run: a SIGHUP that caught an editor's in-place save half done read an empty file, valid
    # TOML with every key at its default: a transcript log the user had turned off was written again.
    path = tmp_path / "c.toml"
    path.write_text("")
    assert load(path)[0] == Config()  # at start, an empty file is the defaults, as ever
    with pytest.raises(ConfigError, match="empty"):
        load(path, settle_s=0.01)
    path.write_text("[log]\n")  # the save under way when the reload reads it ...
    saves = iter(["[log]\nenabled = false\n"])  # ... and done by the next read
    monkeypatch.setattr(cfgmod.time, "sleep", lambda s: path.write_text(next(saves, path.read_text())))
    assert load(path, settle_s=0.01)[0].log.enabled is False
    edits = iter(range(1000))  # one that never stays the same is refused, not read half written
    monkeypatch.setattr(cfgmod.time, "sleep", lambda s: path.write_text(f"# edit {next(edits)}\n[log]\n"))
    with pytest.raises(ConfigError, match="changed each time"):
        load(path, settle_s=0.01)
