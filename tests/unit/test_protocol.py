"""The sans-IO protocol core: framing (§2), envelopes (§3) and parameter typing (§4)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cmuxd import protocol
from cmuxd.protocol import (
    INVALID_JSON_RESPONSE,
    MAX_FRAME,
    OVERSIZED,
    OVERSIZED_RESPONSE,
    FrameDecoder,
    Request,
    RPCError,
    drop_empty_frames,
    error_response,
    event,
    ok_response,
    param_base64,
    param_bool,
    param_int,
    param_str,
    parse_large_request,
    parse_request,
    request_base64,
    unknown_method_message,
)

# ---------------------------------------------------------------------------------------------
# Framing (§2.1, §2.2)


def feed_all(decoder: FrameDecoder, chunks) -> list:
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_max_frame_is_4_mib():
    assert MAX_FRAME == 4_194_304


def test_one_frame_per_lf_without_the_lf():
    d = FrameDecoder()
    assert d.feed(b'{"a":1}\n') == [b'{"a":1}']
    assert d.feed(b"x\ny\nz\n") == [b"x", b"y", b"z"]
    assert d.eof() == []


def test_partial_frame_is_held_until_its_lf():
    d = FrameDecoder()
    assert d.feed(b'{"id":1,') == []
    assert d.feed(b'"method"') == []
    assert d.buffered == len(b'{"id":1,"method"')
    assert d.feed(b':"ping"}\n{"id"') == [b'{"id":1,"method":"ping"}']
    assert d.feed(b":2}\n") == [b'{"id":2}']
    assert d.buffered == 0


def test_empty_frames_are_yielded_as_empty_bytes():
    d = FrameDecoder()
    assert d.feed(b"\n\n") == [b"", b""]
    assert d.feed(b"\n") == [b""]
    assert d.feed(b"") == []


def test_crlf_is_left_to_parse_request():
    d = FrameDecoder()
    frames = d.feed(b'{"method":"ping"}\r\n\r\n')
    assert frames == [b'{"method":"ping"}\r', b"\r"]
    req = parse_request(frames[0])
    assert isinstance(req, Request) and req.method == "ping"
    assert parse_request(frames[1]) is None


@given(st.lists(st.sampled_from([b"a", b"{}", b"\r", b"\n", b"\r\n", b" "]), max_size=30))
def test_dropping_empty_frames_keeps_every_frame_that_is_not_empty(parts):
    data = b"".join(parts)
    def kept(stream: bytes) -> list[bytes]:
        frames = FrameDecoder().feed(stream)
        return [f for f in frames if f not in (b"", b"\r")]
    assert kept(drop_empty_frames(data)) == kept(data)


def test_runs_of_empty_lines_cost_no_frame_each():
    assert drop_empty_frames(b"a\n\r\n\n\r\n\r\n\nb\n") == b"a\nb\n"


def test_final_frame_without_lf_is_returned_at_eof():
    d = FrameDecoder()
    assert d.feed(b'{"id":1}\n{"id":13,"method":"ping"}') == [b'{"id":1}']
    assert d.eof() == [b'{"id":13,"method":"ping"}']


def test_eof_after_lf_or_with_nothing_buffered_yields_nothing():
    assert FrameDecoder().eof() == []
    d = FrameDecoder()
    d.feed(b"abc\n")
    assert d.eof() == []


def _frame_of_size(total: int, id_=12) -> bytes:
    """A ping padded to exactly `total` bytes including its LF."""
    head = b'{"id":%d,"method":"ping","params":{"pad":"' % id_
    tail = b'"}}\n'
    frame = head + b"x" * (total - len(head) - len(tail)) + tail
    assert len(frame) == total
    return frame


@pytest.mark.parametrize("chunk", [None, 65536, 1_000_003])
def test_frame_of_exactly_the_limit_is_accepted(chunk):
    frame = _frame_of_size(MAX_FRAME)
    d = FrameDecoder()
    chunks = [frame] if chunk is None else chunked(frame, chunk)
    out = feed_all(d, chunks)
    assert out == [frame[:-1]]
    assert isinstance(parse_request(out[0]), Request)


def test_frame_of_exactly_the_limit_with_lf_in_a_separate_read():
    frame = _frame_of_size(MAX_FRAME)
    d = FrameDecoder()
    assert d.feed(frame[:-1]) == []
    assert d.feed(b"\n") == [frame[:-1]]


def test_frame_of_exactly_the_limit_counts_the_cr():
    # CR + LF both count: a CRLF frame of MAX_FRAME bytes in total is accepted ...
    body = _frame_of_size(MAX_FRAME - 1)[:-1]
    assert FrameDecoder().feed(body + b"\r\n") == [body + b"\r"]
    # ... and one byte more is not.
    body = _frame_of_size(MAX_FRAME)[:-1]
    assert FrameDecoder().feed(body + b"\r\n") == [OVERSIZED]


@pytest.mark.parametrize("chunk", [None, 4096, 65536, 1_000_003])
def test_frame_one_byte_over_the_limit_is_rejected_once(chunk):
    frame = _frame_of_size(MAX_FRAME + 1)
    data = frame + b'{"id":11,"method":"ping"}\n'
    d = FrameDecoder()
    chunks = [data] if chunk is None else chunked(data, chunk)
    out = feed_all(d, chunks)
    assert out == [OVERSIZED, b'{"id":11,"method":"ping"}']
    assert d.eof() == []


def test_oversized_line_is_reported_once_while_it_streams_in_and_not_buffered():
    d = FrameDecoder()
    out = []
    # 20 MiB spread over 5,120 feeds without an LF.
    for _ in range(5 * 1024):
        out.extend(d.feed(b"y" * 4096))
        assert d.buffered <= MAX_FRAME
    assert out == [OVERSIZED]
    # The rest of the line, including its LF, is discarded; the next line is a frame again.
    assert d.feed(b"yyy\nnext\n") == [b"next"]
    assert d.eof() == []


def test_oversized_line_then_eof_reports_no_second_error():
    d = FrameDecoder(max_frame=8)
    assert d.feed(b"0123456789") == [OVERSIZED]
    assert d.feed(b"abc") == []
    assert d.eof() == []


def test_oversized_lines_inside_one_feed():
    d = FrameDecoder(max_frame=8)
    # 7 bytes + LF = 8 fits; 8 + LF = 9 does not.
    assert d.feed(b"1234567\n12345678\nok\n123456789012\n\n") == [
        b"1234567", OVERSIZED, b"ok", OVERSIZED, b""
    ]


def test_held_bytes_reaching_the_limit_plus_lf_are_oversized():
    d = FrameDecoder(max_frame=8)
    assert feed_all(d, [b"1234", b"5678", b"\nok\n"]) == [OVERSIZED, b"ok"]
    d = FrameDecoder(max_frame=8)
    assert feed_all(d, [b"1234", b"567", b"\nok\n"]) == [b"1234567", b"ok"]


def test_final_frame_without_lf_at_exactly_the_limit_is_accepted():
    # No LF: the frame is its bytes, and the limit counts only what is there.
    d = FrameDecoder(max_frame=8)
    assert d.feed(b"1234") == []
    assert d.feed(b"5678") == []
    assert d.eof() == [b"12345678"]
    d = FrameDecoder(max_frame=8)
    assert feed_all(d, [b"1234", b"5678", b"9"]) == [OVERSIZED]
    assert d.eof() == []


def reference_frames(data: bytes, max_frame: int) -> list:
    """§2.1/§2.2 written as directly as possible: what the decoder must produce."""
    lines = data.split(b"\n")
    last = lines.pop()
    out = [OVERSIZED if len(line) + 1 > max_frame else line for line in lines]
    if last:
        out.append(OVERSIZED if len(last) > max_frame else last)
    return out


stream_bytes = st.lists(
    st.sampled_from([b"\n", b"\r", b"a", b"{", b"}", b"\xff", b"\n\n", b"abcdefgh"]),
    max_size=80,
).map(b"".join) | st.binary(max_size=300)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=stream_bytes, cuts=st.lists(st.integers(0, 300), max_size=12),
       max_frame=st.integers(1, 12))
@example(data=b"12345678\n", cuts=[8], max_frame=8)
@example(data=b"1234567\n", cuts=[7], max_frame=8)
@example(data=b"123456789\nab", cuts=[4, 8, 9], max_frame=8)
def test_split_points_do_not_change_the_frames(data, cuts, max_frame):
    whole = FrameDecoder(max_frame)
    expected = whole.feed(data) + whole.eof()
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    split = FrameDecoder(max_frame)
    got = feed_all(split, pieces) + split.eof()
    assert got == expected
    assert got == reference_frames(data, max_frame)


@settings(max_examples=200)
@given(data=st.binary(max_size=200), max_frame=st.integers(1, 16))
def test_byte_at_a_time_matches_the_reference(data, max_frame):
    d = FrameDecoder(max_frame)
    got = []
    for i in range(len(data)):
        got.extend(d.feed(data[i : i + 1]))
        assert d.buffered <= max_frame
    got.extend(d.eof())
    assert got == reference_frames(data, max_frame)


# ---------------------------------------------------------------------------------------------
# Requests and parse errors (§2.3, §3.1)


@given(st.text(alphabet='{}[]":, \t\r1x\\', max_size=12).map(str.encode))
@example(b"{x}")
@example(b' { "id" : 1 } \r')
@example(b"{}\t")
def test_junk_is_told_from_requests_without_a_parse_as_a_full_parse_would(frame):
    """The cheap checks that answer junk without a parse reject only what a parse rejects."""
    try:
        obj = json.loads(frame)
        valid = type(obj) is dict and type(obj.get("method", "")) in (str, type(None)) and \
            type(obj.get("params", {})) in (dict, type(None))
    except ValueError:
        valid = False
    got = parse_request(frame)
    if valid:
        assert type(got) is Request
    else:
        assert got is INVALID_JSON_RESPONSE or (got is None and frame in (b"", b"\r"))


def written(req) -> tuple:
    """What a pty.write request amounts to: its method, id, other params and decoded data."""
    if type(req) is not Request:
        return (req,)
    params = dict(req.params)
    if params.pop("data_base64", None) == "" and req.payload is None:
        params["empty"] = True
    try:
        data = request_base64(req, "missing")
    except RPCError as exc:
        data = exc.message
    return req.method, req.id, req.has_id, params, data


BIG = base64.b64encode(bytes(range(256)) * 400).decode()


@pytest.mark.parametrize("frame", [
    b'{"method":"pty.write","params":{"session_id":"s","data_base64":"%s"}}' % BIG.encode(),
    b'{"id":3,"method":"pty.write","params":{"data_base64":"%s","seq":1}}\r' % BIG.encode(),
    b'{"method":"pty.write","params":{"data_base64":"%s"}}' % BIG.replace("/", "\\/").encode(),
    b'{"method":"pty.write","params":{"data_base64":"%s!"}}' % BIG.encode(),
    b'{"method":"pty.write","params":{"data_base64":"%s","data_base64":"QQ=="}}' % BIG.encode(),
    b'{"method":"pty.write","params":{"data_base64" : "", "x":{"data_base64":"%s"}}}' % BIG.encode(),
    b'{"data_base64":"%s","method":"pty.write","params":{}}' % BIG.encode(),
    b'{"method":"pty.write","params":{"data_base\\u0036\\u0034":"", "x":"\\"data_base64\\":\\"%s"}}'
    % BIG.encode(),
    b'{"method":"pty.write","params":{"data_base64":"%s"}' % BIG.encode(),
    b'["data_base64":"%s"]' % BIG.encode(),
], ids=["plain", "id-and-cr", "escaped", "invalid", "twice", "nested", "top-level",
        "escaped-key", "truncated", "not-an-object"])
def test_a_large_frame_means_what_it_means_parsed_whole(frame):
    large = parse_large_request(frame)
    assert written(large) == written(parse_request(frame))


def test_a_plain_large_write_is_decoded_from_the_frame():
    frame = b'{"method":"pty.write","params":{"data_base64":"%s"}}' % BIG.encode()
    req = parse_large_request(bytearray(frame))
    assert req.payload == bytes(range(256)) * 400 and req.params == {"data_base64": ""}


def test_parse_request_fields():
    req = parse_request(b'{"id":7,"method":"ping","params":{"a":1}}')
    assert isinstance(req, Request)
    assert (req.method, req.params, req.id, req.has_id) == ("ping", {"a": 1}, 7, True)


def test_missing_id_and_null_id_differ_only_in_has_id():
    absent = parse_request(b'{"method":"ping"}')
    null = parse_request(b'{"id":null,"method":"ping"}')
    assert (absent.id, absent.has_id) == (None, False)
    assert (null.id, null.has_id) == (None, True)


def test_params_missing_or_null_is_an_empty_object():
    assert parse_request(b'{"method":"ping"}').params == {}
    assert parse_request(b'{"method":"ping","params":null}').params == {}


@pytest.mark.parametrize("frame", [b'{"id":6}', b'{"id":6,"method":null}', b'{"id":6,"method":""}',
                                   b'{"id":6,"Method":"ping"}'])
def test_missing_method_parses_with_an_empty_method(frame):
    # The dispatcher turns this into "method is required", keeping the id.
    req = parse_request(frame)
    assert isinstance(req, Request)
    assert req.method == "" and req.id == 6


def test_unknown_top_level_keys_are_ignored_and_keys_are_case_sensitive():
    req = parse_request(b'{"jsonrpc":"2.0","ID":5,"Params":[1],"id":9,"method":"ping","params":null}')
    assert (req.method, req.params, req.id) == ("ping", {}, 9)


INVALID_FRAMES = [
    b'{"id":8,"method":',
    b"[1,2]",
    b"   ",
    b"\t",
    b'{"id":8,"method":"ping","params":[1]}',
    b'{"id":8,"method":"ping","params":"x"}',
    b'{"id":8,"method":"ping","params":1}',
    b'{"id":8,"method":"ping","params":true}',
    b'{"id":8,"method":7}',
    b'{"id":8,"method":true}',
    b'{"id":8,"method":{}}',
    b'{"id":8,"method":["ping"]}',
    b'"ping"',
    b"12",
    b"true",
    b"null",
    b'{"id":8,"method":"ping"} x',
    b'{"id":8,"method":"ping"}{}',
    b'{"id":NaN,"method":"ping"}',
    b'{"id":Infinity,"method":"ping"}',
    b'{"id":-Infinity,"method":"ping"}',
    b'{"id":8,"method":"ping",}',
    b"{'id':8}",
    b"\xff\xfe",
    b"\r\r",  # one CR is removed; a lone CR is whitespace, not empty
]


@pytest.mark.parametrize("frame", INVALID_FRAMES)
def test_invalid_frames_get_invalid_json_without_id(frame):
    assert parse_request(frame) == INVALID_JSON_RESPONSE


def test_invalid_json_response_bytes():
    assert INVALID_JSON_RESPONSE.endswith(b"\n") and INVALID_JSON_RESPONSE.count(b"\n") == 1
    assert json.loads(INVALID_JSON_RESPONSE) == {
        "ok": False, "error": {"code": "invalid_request", "message": "invalid JSON request"}}
    assert json.loads(OVERSIZED_RESPONSE) == {
        "ok": False,
        "error": {"code": "invalid_request", "message": "request frame exceeds maximum size"}}


@pytest.mark.parametrize("frame", [b"", b"\r"])
def test_empty_frames_are_skipped(frame):
    assert parse_request(frame) is None


def test_trailing_whitespace_after_the_object_is_fine():
    assert parse_request(b'  {"method":"ping"} \t\r').method == "ping"


def test_invalid_utf8_in_strings_becomes_replacement_characters():
    req = parse_request(b'{"id":"a\xffb","method":"pi\xc3ng","params":{"s":"\xed\xa0\x80"}}')
    assert isinstance(req, Request)
    assert req.id == "a\ufffdb"
    assert req.method.startswith("pi") and "\ufffd" in req.method
    assert set(req.params["s"]) == {"\ufffd"}
    # And the echo encodes.
    assert json.loads(ok_response(req.id, {}))["id"] == "a\ufffdb"


def test_lone_surrogate_escapes_become_replacement_characters():
    # "\ud800" is valid JSON text (RFC 8259 §7); it cannot be echoed as UTF-8, so it is
    # treated like invalid UTF-8.
    req = parse_request(b'{"id":"x\\ud800y","method":"ping","params":{"k":"\\udc00"}}')
    assert isinstance(req, Request)
    assert req.id == "x\ufffdy"
    assert req.params == {"k": "\ufffd"}
    assert json.loads(ok_response(req.id, {}))["id"] == "x\ufffdy"
    # A valid pair still decodes to its character.
    assert parse_request(b'{"id":"\\ud83d\\ude00","method":"ping"}').id == "\U0001F600"


# ---------------------------------------------------------------------------------------------
# id echo (§3.2) and response encoding (§3.3)


ECHO_IDS = [0, 1, -1, 1.5, False, True, "", "7", {}, [], {"k": [1]}, [None, {"a": "b"}], "é\u2028<>&"]


@pytest.mark.parametrize("value", ECHO_IDS, ids=repr)
def test_non_null_ids_are_echoed_with_their_type(value):
    req = parse_request(json.dumps({"id": value, "method": "ping"}).encode())
    for frame in (ok_response(req.id, {"pong": True}), error_response(req.id, "x", "y")):
        decoded = json.loads(frame)
        assert "id" in decoded
        assert decoded["id"] == value and type(decoded["id"]) is type(value)


def test_null_or_absent_id_gives_a_response_without_id():
    for frame in (b'{"method":"ping"}', b'{"id":null,"method":"ping"}'):
        req = parse_request(frame)
        assert "id" not in json.loads(ok_response(req.id, {}))
        assert "id" not in json.loads(error_response(req.id, "c", "m"))


@pytest.mark.parametrize("text,value", [(b"1e3", 1000), (b"1.0", 1), (b"-0", 0),
                                        (b"9007199254740993", 9007199254740993)])
def test_numeric_ids_keep_their_value(text, value):
    req = parse_request(b'{"id":' + text + b',"method":"ping"}')
    echoed = json.loads(ok_response(req.id, {}))["id"]
    assert echoed == value or abs(echoed - value) <= abs(value) * 2**-52


@pytest.mark.parametrize("text", [b"18446744073709551616", b"-9223372036854775809",
                                  b"123456789012345678901234567890", b"1e300"])
def test_huge_numeric_ids_still_get_an_answer(text):
    req = parse_request(b'{"id":' + text + b',"method":"ping"}')
    assert isinstance(req, Request)
    echoed = json.loads(ok_response(req.id, {}))["id"]
    assert echoed == pytest.approx(float(text), rel=1e-15)


def test_responses_are_one_compact_line():
    frame = ok_response("a\nb", {"s": "x\r\ny\u2028", "n": [1, 2]})
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1 and b"\r" not in frame
    assert b" " not in frame
    assert json.loads(frame) == {"id": "a\nb", "ok": True, "result": {"s": "x\r\ny\u2028", "n": [1, 2]}}
    frame = error_response(None, "not_found", "stream not found")
    assert json.loads(frame) == {"ok": False, "error": {"code": "not_found", "message": "stream not found"}}


def test_events_omit_empty_strings_and_zeros():
    msg = event("pty.input_ack", session_id="t", attachment_id="", attachment_token="tok", seq=0,
                code=None)
    assert msg == {"event": "pty.input_ack", "session_id": "t", "attachment_token": "tok"}
    assert event("pty.input_ack", seq=1) == {"event": "pty.input_ack", "seq": 1}
    assert b"\n" not in protocol.encode(msg)[:-1]


@pytest.mark.parametrize("method,message", [
    ("nope", 'unknown method "nope"'),
    ("PING", 'unknown method "PING"'),
    ("daemon.shutdown", 'unknown method "daemon.shutdown"'),
    ('a"b', 'unknown method "a\\"b"'),
    ("a\\b", 'unknown method "a\\\\b"'),
])
def test_unknown_method_message(method, message):
    assert unknown_method_message(method) == message


@given(st.text())
def test_unknown_method_message_quotes_any_name(method):
    message = unknown_method_message(method)
    assert message.startswith('unknown method "') and message.endswith('"')
    quoted = message[len("unknown method "):]
    assert not any(ord(c) < 0x20 for c in quoted)
    assert json.loads(quoted) == method


# ---------------------------------------------------------------------------------------------
# Parameter typing (§4)


def wire(text: str) -> dict:
    """Params as the daemon would see them after parsing `text`."""
    req = parse_request(('{"method":"m","params":' + text + "}").encode())
    assert isinstance(req, Request), text
    return req.params


@pytest.mark.parametrize("text,value", [
    ('{"n":80}', 80),
    ('{"n":80.0}', 80),
    ('{"n":8e1}', 80),
    ('{"n":8.0E+1}', 80),
    ('{"n":800e-1}', 80),
    ('{"n":-0.0}', 0),
    ('{"n":0}', 0),
    ('{"n":-5}', -5),
    ('{"n":9223372036854775807}', 2**63 - 1),
    ('{"n":-9223372036854775808}', -(2**63)),
])
def test_param_int_accepts_integral_numbers(text, value):
    got = param_int(wire(text), "n")
    assert got == value and type(got) is int


@pytest.mark.parametrize("text", [
    '{"n":80.9}', '{"n":0.5}', '{"n":"80"}', '{"n":true}', '{"n":false}', '{"n":null}', "{}",
    '{"n":[80]}', '{"n":{"v":80}}',
    '{"n":9223372036854775808}', '{"n":-9223372036854775809}', '{"n":18446744073709551616}',
    '{"n":1e19}', '{"n":-1e19}', '{"n":9.3e18}', '{"n":1e300}',
])
def test_param_int_treats_everything_else_as_absent(text):
    assert param_int(wire(text), "n") is None


def test_param_str():
    p = wire('{"a":"x","b":"","c":null,"d":1,"e":["x"],"f":"  y \\t","g":"   "}')
    assert param_str(p, "a") == "x"
    for key in ("b", "c", "d", "e", "missing"):
        assert param_str(p, key) is None
    assert param_str(p, "f") == "  y \t"
    assert param_str(p, "f", trim=True) == "y"
    assert param_str(p, "g", trim=True) is None
    assert param_str(p, "g") == "   "


def test_param_bool():
    p = wire('{"t":true,"f":false,"s":"true","n":1,"z":null}')
    assert param_bool(p, "t") is True
    for key in ("f", "s", "n", "z", "missing"):
        assert param_bool(p, key) is False


@pytest.mark.parametrize("value,data", [
    ("", b""),
    ("aGk=", b"hi"),
    ("aGVsbG8=", b"hello"),
    ("dGFpbA==", b"tail"),
    ("aG\r\nk=", b"hi"),
    ("\naGVs\nbG8=\n", b"hello"),
    ("\r\n", b""),
    ("+/+/", bytes([0xFB, 0xFF, 0xBF])),
])
def test_param_base64_decodes_standard_base64(value, data):
    assert param_base64({"data_base64": value}, "data_base64", "m requires data_base64") == data


@pytest.mark.parametrize("value", [None, 1, True, [], {}, ["aGk="]])
def test_param_base64_non_string_is_missing(value):
    params = {} if value is None else {"data_base64": value}
    for p in (params, {"data_base64": None}):
        with pytest.raises(RPCError) as info:
            param_base64(p, "data_base64", "proxy.write requires data_base64")
        assert (info.value.code, info.value.message) == (
            "invalid_params", "proxy.write requires data_base64")


@pytest.mark.parametrize("value", [
    "%%%", "aGk", "aGk==", "aG=k", "a", "YQ=", "Y===", "====", "aGk=aGk=", " aGk=", "aGk= ",
    "aGk=\t", "-_-_", "aGk\u00e9", "\u00e9\u00e9\u00e9\u00e9", "aG k=",
])
def test_param_base64_rejects_invalid_base64(value):
    with pytest.raises(RPCError) as info:
        param_base64({"data_base64": value}, "data_base64", "m requires data_base64")
    assert (info.value.code, info.value.message) == (
        "invalid_params", "data_base64 must be valid base64")


@given(st.binary(max_size=200))
def test_param_base64_round_trips(data):
    import base64

    text = base64.b64encode(data).decode()
    assert param_base64({"k": text}, "k", "m") == data
    # Line breaks anywhere inside are ignored.
    broken = "\r\n".join(text[i : i + 7] for i in range(0, len(text), 7))
    assert param_base64({"k": broken}, "k", "m") == data


# ---------------------------------------------------------------------------------------------
# parse_request never raises


@settings(max_examples=500)
@given(st.binary(max_size=300))
@example(b'{"id":"\\ud800","method":"ping"}')
@example(b'{"id":1e400,"method":"ping"}')
@example(b"[" * 5000)
@example(b'{"a":' * 3000)
def test_parse_request_never_raises_on_bytes(frame):
    result = parse_request(frame)
    check_parse_result(result)


def check_parse_result(result):
    assert result is None or result == INVALID_JSON_RESPONSE or isinstance(result, Request)
    if isinstance(result, Request):
        assert type(result.method) is str
        assert type(result.params) is dict
        # Whatever was accepted can be answered: the id echo encodes and round-trips.
        frame = ok_response(result.id, {})
        decoded = json.loads(frame)
        if result.id is not None:
            assert decoded["id"] == result.id


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(
    obj=st.dictionaries(
        st.sampled_from(["id", "method", "params", "jsonrpc", "Method"]), json_values, max_size=5
    ),
    method=st.none() | st.sampled_from(["ping", "", "proxy.open", "nope"]) | json_values,
    crlf=st.booleans(),
)
def test_parse_request_on_json_objects(obj, method, crlf):
    if method is not None:
        obj["method"] = method
    frame = json.dumps(obj).encode() + (b"\r" if crlf else b"")
    result = parse_request(frame)
    check_parse_result(result)
    m, p = obj.get("method"), obj.get("params")
    envelope_ok = (m is None or type(m) is str) and (p is None or type(p) is dict)
    if not envelope_ok:
        assert result == INVALID_JSON_RESPONSE
        return
    assert isinstance(result, Request)
    assert result.method == (m or "")
    assert result.params == (p or {})
    assert result.has_id == ("id" in obj)
    if obj.get("id") is not None:
        value = obj["id"]
        assert json.loads(ok_response(result.id, {}))["id"] == value


@settings(max_examples=300)
@given(st.text(max_size=100))
def test_parse_request_never_raises_on_text(text):
    check_parse_result(parse_request(text.encode()))


def test_held_is_the_unfinished_line_to_hand_another_decoder():
    decoder = FrameDecoder()
    assert decoder.held() == b""
    assert decoder.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    decoder.feed(b":2")
    assert decoder.held() == b'{"b":2'
    other = FrameDecoder()
    assert other.feed(decoder.held() + b"}\n") == [b'{"b":2}']


# A repeated notification known from its bytes (protocol.repeat_shape)


def _keystroke(data_b64: str = "YQ==", **extra) -> bytes:
    params = {"session_id": "s", "attachment_id": "a", "client_attachment_token": "t",
              "data_base64": data_b64, **extra}
    return json.dumps({"method": "pty.write", "params": params}, separators=(",", ":")).encode()


def _shape(frame: bytes, count_key=None):
    req = parse_request(frame)
    assert isinstance(req, Request)
    return protocol.repeat_shape(frame, req, "data_base64", count_key)


def _same_but(frame: bytes, **values) -> dict:
    return dict(parse_request(frame).params, **values)


def test_a_keystroke_frame_is_known_by_its_bytes_around_the_data():
    frame = _keystroke("YQ==")
    shape = _shape(frame)
    assert shape.fullmatch(frame).group("text") == b"YQ=="
    # Every base64 text in the data's place is the same request with only that changed...
    for text in ("", "eHl6", "AAAA" * 100, "QUJD", "////"):
        other = _keystroke(text)
        assert shape.fullmatch(other).group("text") == text.encode()
        assert parse_request(other).params == _same_but(frame, data_base64=text)
    # ...and nothing else matches: other names, a quote or escape in the data, another key.
    for other in (_keystroke("YQ==", seq=1), _keystroke('YQ"'), _keystroke("Y\\Q"),
                  _keystroke("YQ==").replace(b'"s"', b'"S"'), frame + b" ", b" " + frame):
        assert shape.fullmatch(other) is None, other


def test_a_sequenced_keystroke_is_known_by_its_bytes_around_the_data_and_the_seq():
    frame = _keystroke("YQ==", seq=12)
    shape = _shape(frame, "seq")
    for text, seq in (("eHl6", 13), ("", 0), ("QUJD", 999_999_999_999_999)):
        other = _keystroke(text, seq=seq)
        m = shape.fullmatch(other)
        assert (m.group("text"), int(m.group("count"))) == (text.encode(), seq)
        assert parse_request(other).params == _same_but(frame, data_base64=text, seq=seq)
    # Not a canonical short integer: left to the parser (a leading zero is not JSON; 16
    # digits may not fit the checks the handler makes).
    for seq in (b"012", b"-1", b"1.0", b"1e3", b"1234567890123456", b'"1"'):
        assert shape.fullmatch(frame.replace(b'"seq":12', b'"seq":' + seq)) is None, seq
    # A seq asked for and not there: no shape.
    assert _shape(_keystroke("YQ=="), "seq") is None


def test_a_shape_holds_whatever_order_the_keys_come_in():
    frame = b'{"params":{"seq":3,"data_base64":"YQ==","session_id":"s"},"method":"pty.write"}'
    shape = _shape(frame, "seq")
    other = frame.replace(b'"seq":3', b'"seq":4').replace(b"YQ==", b"eHl6")
    assert shape.fullmatch(other) is not None
    assert parse_request(other).params == _same_but(frame, data_base64="eHl6", seq=4)


@pytest.mark.parametrize("frame, why", [
    (b'{"id":1,"method":"pty.write","params":{"data_base64":"YQ=="}}', "a request, not a notification"),
    (_keystroke(""), "an empty value is found anywhere"),
    (_keystroke("YQ==" * 2000), "too long to keep"),
    (b'{"method":"pty.write","params":{"data_base64":"YQ==","session_id":"YQ=="}}',
     "the last match is another key's value"),
    (b'{"method":"pty.write","params":{"data_base64":"Y\\u0051=="}}', "the value is escaped in the frame"),
    (b'{"method":"pty.write","params":{"data_base64":7}}', "not a string"),
])
def test_a_frame_whose_value_is_not_plainly_there_has_no_shape(frame, why):
    assert _shape(frame) is None, why


@pytest.mark.parametrize("frame, why", [
    (_keystroke("YQ==", seq=True), "not an integer"),
    (_keystroke("YQ==", seq=1.0), "a float"),
    (_keystroke("YQ==", seq=10**15), "too long to be sure of"),
    (b'{"method":"pty.write","params":{"data_base64":"YQ==","seq": 1}}', "not written plainly"),
])
def test_a_seq_that_is_not_plainly_there_has_no_shape(frame, why):
    assert _shape(frame, "seq") is None, why


def test_a_duplicate_seq_is_shaped_at_the_one_that_counts():
    frame = b'{"method":"pty.write","params":{"data_base64":"YQ==","seq":1,"seq":2}}'
    other = b'{"method":"pty.write","params":{"data_base64":"YQ==","seq":1,"seq":5}}'
    assert int(_shape(frame, "seq").fullmatch(other).group("count")) == 5
    assert parse_request(other).params["seq"] == 5


def test_a_duplicate_key_is_shaped_at_the_value_that_counts():
    frame = b'{"method":"pty.write","params":{"data_base64":"AAAA","data_base64":"YQ=="}}'
    shape = _shape(frame)
    other = frame.replace(b"YQ==", b"eHl6")
    assert shape.fullmatch(other) is not None
    assert parse_request(other).params == {"data_base64": "eHl6"}
    assert shape.fullmatch(frame.replace(b"AAAA", b"BBBB")) is None


def test_the_value_quoted_inside_another_string_is_not_taken_for_it():
    frame = (b'{"method":"pty.write","params":{"session_id":"x\\"YQ==\\"",'
             b'"data_base64":"YQ=="}}')
    other = frame[:-7] + b'eHl6"}}'
    assert _shape(frame).fullmatch(other) is not None
    assert parse_request(other).params == {"session_id": 'x"YQ=="', "data_base64": "eHl6"}
