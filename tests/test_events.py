import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captiond.events import (EVENT_TYPES, Command, Final, Hello, Partial, ProtocolError, Word, encode,
                             parse_command)


def test_encode_stamps_type_seq_ts_and_fields():
    line = encode(Final(3, 1.5, 2.25, "hi there", (Word("hi", 1.5, 1.7, 0.9),), "en", 0.31, ("x",)), 17, 1000.5)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    body = json.loads(line)
    assert body == {"type": "final", "seq": 17, "ts": 1000.5, "utt": 3, "start": 1.5, "end": 2.25,
                    "text": "hi there", "words": [{"word": "hi", "start": 1.5, "end": 1.7, "p": 0.9}],
                    "language": "en", "latency": 0.31, "flags": ["x"]}


def test_hello_carries_protocol_version():
    body = json.loads(encode(Hello("0.1.0", "tiny.en", 16000, "listening"), 0, 1.0))
    assert body["protocol"] == 1 and body["type"] == "hello"


def test_non_finite_floats_never_reach_the_wire():
    body = json.loads(encode(Partial(1, 1, float("nan"), float("inf"), "", "a", "a"), 1, 1.0))
    assert body["start"] == 0.0 and body["end"] == 0.0


def test_parse_commands():
    assert parse_command(b'{"cmd":"ping"}\n') == Command("ping")
    sub = parse_command(b'{"cmd":"subscribe","types":["final","partial"],"since":5}')
    assert sub.types == frozenset({"final", "partial"}) and sub.since == 5


@pytest.mark.parametrize("line, code", [
    (b"not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[" * 60000, "bad_json"),  # json's recursion limit: a RecursionError, not a ValueError
    (b"[1,2]", "bad_command"),
    (b'{"cmd":"explode"}', "unknown_command"),
    (b'{"cmd":"subscribe","types":"final"}', "bad_command"),
    (b'{"cmd":"subscribe","types":["nope"]}', "bad_command"),
    (b'{"cmd":"subscribe","since":-1}', "bad_command"),
    (b'{"cmd":"subscribe","since":true}', "bad_command"),
    (b"x" * 70000, "line_too_long"),
])
def test_malformed_lines_raise_protocol_errors_with_codes(line, code):
    with pytest.raises(ProtocolError) as err:
        parse_command(line)
    assert err.value.code == code and str(err.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"cmd": st.sampled_from(["subscribe", "ping", "x"]),
                                "types": json_values, "since": json_values}).map(lambda v: json.dumps(v).encode()))
def test_parser_never_fails_any_other_way(line):
    try:
        cmd = parse_command(line)
    except ProtocolError as exc:
        assert exc.code and str(exc)
    else:
        assert cmd.cmd in ("subscribe", "ping", "pause", "resume", "status", "context", "finalize")
        assert cmd.types is None or cmd.types <= set(EVENT_TYPES)


def test_a_number_too_long_for_python_is_bad_json_without_python_advice():
    with pytest.raises(ProtocolError) as err:
        parse_command(b'{"cmd":"subscribe","since":' + b"9" * 5000 + b"}")
    assert err.value.code == "bad_json" and str(err.value) == "line is not JSON: a number too long"


def test_context_command():
    cmd = parse_command(b'{"cmd":"context","prompt":"captiond, Kubernetes","hotwords":"kubectl"}')
    assert (cmd.cmd, cmd.prompt, cmd.hotwords) == ("context", "captiond, Kubernetes", "kubectl")
    assert parse_command(b'{"cmd":"context","hotwords":"x"}').prompt is None
    for bad in (b'{"cmd":"context","prompt":7}', b'{"cmd":"context","prompt":"' + b"x" * 1001 + b'"}'):
        with pytest.raises(ProtocolError, match="context"):
            parse_command(bad)


def test_an_encoded_line_holds_no_character_a_terminal_acts_on_and_always_encodes():
    # json.dumps escapes C0 controls only: a C1 CSI (U+009B) or a bidi override in a file name went
    # raw to whatever `captiond listen` printed to, and a lone surrogate (a name that is not UTF-8)
    # could not be encoded at all.
    text = "a\u009b2Jb\u202ec\x7fd\udcffe\tf"
    line = encode(Final(1, 0.0, 1.0, text, (), "en", 0.1, ()), 1, 0.0)
    raw = line.decode("utf-8")
    assert not any(c in raw for c in "\u009b\u202e\x7f\udcff\t") and raw.endswith("}\n") and raw.count("\n") == 1
    assert json.loads(raw)["text"] == text  # escapes: the text itself is unchanged
    assert encode(Final(1, 0.0, 1.0, "plain é 日本", (), "en", 0.1, ()), 1, 0.0).decode().count("\\u") == 0
