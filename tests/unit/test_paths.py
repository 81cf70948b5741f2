"""``core.paths``: the request target routing, authorization and the app see. Istio's
documented normalization, row by row (istio.io "Authorization Policy Normalization" and
the security best practices' table of ``pathNormalization`` options), the request
target forms of RFC 9112 §3.2, and properties over generated paths."""

from __future__ import annotations

import pytest
from fuzzing import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from nodeagent.core.paths import (
    BASE,
    DECODE_AND_MERGE_SLASHES,
    MERGE_SLASHES,
    NONE,
    PATH_NORMALIZATIONS,
    BadTarget,
    normalize_path,
    request_target,
)

# (path as sent, then what NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES make of it)
ISTIO_TABLE = [
    # 1. single percent-encoded characters: unreserved ones decoded by BASE
    ("/%2d", "/%2d", "/-", "/-", "/-"),
    ("/a%2eb", "/a%2eb", "/a.b", "/a.b", "/a.b"),
    ("/%30%39", "/%30%39", "/09", "/09", "/09"),
    ("/%41%5a", "/%41%5a", "/AZ", "/AZ", "/AZ"),
    ("/%5f", "/%5f", "/_", "/_", "/_"),
    ("/%61%7A", "/%61%7A", "/az", "/az", "/az"),
    ("/%7e", "/%7e", "/~", "/~", "/~"),
    #    %2f and %5c (either case) only by DECODE_AND_MERGE_SLASHES
    ("/some%2fdata/%61%62%63", "/some%2fdata/%61%62%63", "/some%2Fdata/abc",
     "/some%2Fdata/abc", "/some/data/abc"),
    ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%5cb", "/a%5cb", "/a%5Cb", "/a%5Cb", "/a/b"),
    ("/a%5C%5cb", "/a%5C%5cb", "/a%5C%5Cb", "/a%5C%5Cb", "/a/b"),
    #    once, never twice: %25 is "%", not unreserved, so %252e stays
    ("/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin",
     "/%252e%252e/admin"),
    # 2. backslashes become slashes (BASE)
    ("/some\\data", "/some\\data", "/some/data", "/some/data", "/some/data"),
    ("\\da", "\\da", "/da", "/da", "/da"),
    # 3. runs of slashes merged (MERGE_SLASHES)
    ("/some//data///abc", "/some//data///abc", "/some//data///abc", "/some/data/abc",
     "/some/data/abc"),
    ("/a//b", "/a//b", "/a//b", "/a/b", "/a/b"),
    # 4. dot segments (RFC 3986 §5.2.4; BASE)
    ("/public/./data/abc/../xyz", "/public/./data/abc/../xyz", "/public/data/xyz",
     "/public/data/xyz", "/public/data/xyz"),
    ("/a/../b", "/a/../b", "/b", "/b", "/b"),
    ("/../../admin", "/../../admin", "/admin", "/admin", "/admin"),
    ("/a/b/..", "/a/b/..", "/a/", "/a/", "/a/"),
    ("/x/%2e%2E/admin", "/x/%2e%2E/admin", "/admin", "/admin", "/admin"),
    ("/x/..\\admin", "/x/..\\admin", "/admin", "/admin", "/admin"),
    ("/a%2f..%2fadmin", "/a%2f..%2fadmin", "/a%2F..%2Fadmin", "/a%2F..%2Fadmin", "/admin"),
    ("/a//../b", "/a//../b", "/a/b", "/a/b", "/a/b"),  # dots first, then merged (Envoy's order)
    # docs/policy.md's example
    ("/a/./b\\c/../%7e//d%2Fe?q=/..", "/a/./b\\c/../%7e//d%2Fe?q=/..", "/a/b/~//d%2Fe?q=/..",
     "/a/b/~/d%2Fe?q=/..", "/a/b/~/d/e?q=/.."),
    # 5. the query is left as sent (policy matches the path without it)
    ("/foo?v=1", "/foo?v=1", "/foo?v=1", "/foo?v=1", "/foo?v=1"),
    ("/a/./b?x=/../%2f//", "/a/./b?x=/../%2f//", "/a/b?x=/../%2f//", "/a/b?x=/../%2f//",
     "/a/b?x=/../%2f//"),
]


@pytest.mark.parametrize("row", ISTIO_TABLE, ids=lambda r: r[0])
@pytest.mark.parametrize("mode", PATH_NORMALIZATIONS)
def test_istio_normalization_table(row: tuple[str, ...], mode: str) -> None:
    want = row[1 + PATH_NORMALIZATIONS.index(mode)]
    assert normalize_path(row[0], mode) == want
    if row[0].startswith("/"):  # what the L7 path does with the request line
        assert request_target("GET", row[0], "web", mode) == (want, "web")


@pytest.mark.parametrize("mode", PATH_NORMALIZATIONS)
@pytest.mark.parametrize(
    "path", ["/adm%00in", "/%00", "/bad%zz", "/bad%4", "/bad%", "/a#frag", "/a?q#f", "/%0G"]
)
def test_null_malformed_escapes_and_fragments_are_refused_under_every_option(
    path: str, mode: str
) -> None:
    with pytest.raises(BadTarget):
        request_target("GET", path, "web", mode)


@pytest.mark.parametrize(
    ("method", "target", "want"),
    [
        ("GET", "http://web/admin", ("/admin", "web")),
        ("GET", "HTTP://web/admin", ("/admin", "web")),
        ("GET", "hTtPs://web:8443/a/../admin?x=1", ("/admin?x=1", "web:8443")),
        ("GET", "http://web", ("/", "web")),
        ("GET", "http://web?q", ("/?q", "web")),
        ("GET", "http://web/x/..\\%61dmin", ("/admin", "web")),
        ("OPTIONS", "*", ("*", "host")),
        ("OPTIONS", "http://web/", ("/", "web")),
    ],
)
def test_absolute_form_becomes_origin_form_and_names_the_authority(
    method: str, target: str, want: tuple[str, str]
) -> None:
    assert request_target(method, target, "host", BASE) == want


@pytest.mark.parametrize(
    ("method", "target", "why"),
    [
        ("GET", "admin", "neither origin-form nor absolute"),
        ("GET", "*", "only for OPTIONS"),
        ("GET", "ftp://web/admin", "neither origin-form nor absolute"),
        ("GET", "http:///admin", "no host"),
        ("GET", "http://user@web/admin", "userinfo"),
        ("GET", "", "neither origin-form nor absolute"),
        ("CONNECT", "web:80", "CONNECT is not served"),
        ("CONNECT", "", "CONNECT is not served"),
    ],
)
def test_other_forms_are_refused_with_a_reason(method: str, target: str, why: str) -> None:
    with pytest.raises(BadTarget, match=why):
        request_target(method, target, "host", BASE)


def test_the_common_case_is_returned_as_is() -> None:
    target = "/api/v1/items?page=2"
    assert request_target("GET", target, "web", BASE)[0] is target


_PIECES = ["a", "b", "admin", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%41",
           "%25", "%252e", "\\", "", "~", "x.y", ".a", "..."]
paths = st.lists(st.sampled_from(_PIECES), max_size=12).map(lambda p: "/" + "/".join(p))
queries = st.sampled_from(["", "?", "?a=/../b", "?x=%2f//.."])


def _segments(path: str) -> list[str]:
    return path.split("?", 1)[0].split("/")


@fuzz(2)
@given(path=paths, query=queries, mode=st.sampled_from(PATH_NORMALIZATIONS))
def test_normalization_is_idempotent_and_leaves_no_dot_segments(
    path: str, query: str, mode: str
) -> None:
    once = normalize_path(path + query, mode)
    assert normalize_path(once, mode) == once
    assert request_target("GET", once, "web", mode)[0] == once
    assert once.endswith(query) if query else "?" not in once
    if mode == NONE:
        assert once == path + query
        return
    clean = once.split("?", 1)[0]
    assert clean.startswith("/")
    assert "." not in _segments(once) and ".." not in _segments(once)
    assert "\\" not in clean
    if mode != BASE:
        assert "//" not in clean
    if mode == DECODE_AND_MERGE_SLASHES:
        assert "%2F" not in clean.upper() and "%5C" not in clean.upper()


@fuzz()
@given(path=paths, mode=st.sampled_from((BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)))
def test_absolute_form_gets_what_origin_form_gets(path: str, mode: str) -> None:
    assert request_target("GET", "hTTp://web" + path, "other", mode) == (
        request_target("GET", path, "web", mode)[0],
        "web",
    )


_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
escapes = st.tuples(st.just("%"), st.sampled_from(_HEX), st.sampled_from(_HEX)).map("".join)
_BENIGN = ["/", "/", "/", "\\", ".", "..", "a", "B", "~", "?", "é", ";", "%2f", "%2F", "%5c",
           "%5C", "%2e", "%2E", "%25", "%41"]  # fmt: skip
_RARE = ["#", " ", "\x00", "%00", "%", "%g0", "%2", "http://", "*"]
targets = st.tuples(
    st.sampled_from(["/"] * 6 + ["http://web", "hTtPs://h:1/", "*", "", "web:80"]),
    st.lists(st.sampled_from(_BENIGN) | escapes | st.sampled_from(_RARE) | st.text(max_size=2),
             max_size=16).map("".join),
).map("".join)  # fmt: skip


@fuzz(3)
@given(target=targets, mode=st.sampled_from(PATH_NORMALIZATIONS),
       method=st.sampled_from(["GET", "OPTIONS", "CONNECT"]))  # fmt: skip
def test_any_target_is_a_normalized_origin_form_or_a_400(target: str, mode: str,
                                                         method: str) -> None:  # fmt: skip
    try:
        out, _authority = request_target(method, target, "web", mode)
    except BadTarget as e:
        assert str(e)  # a 400 that says why
        event("400")
        return
    event("origin-form" if target.startswith("/") else "other")
    if out == "*":
        assert method == "OPTIONS" and target == "*"
        return
    assert out.startswith("/") and "#" not in out
    assert request_target(method, out, "web", mode)[0] == out  # idempotent
    path = out.split("?", 1)[0]
    assert "%00" not in path
    sent = target.split("?", 1)[0] if target.startswith("/") else path
    if mode == NONE:
        assert out == target or not target.startswith("/")
        return
    segments = path.split("/")
    assert "." not in segments and ".." not in segments and "\\" not in path
    for i in (i for i, c in enumerate(path) if c == "%"):  # escapes left: upper-case, needed
        h = path[i + 1 : i + 3]
        assert h == h.upper() and chr(int(h, 16)) not in _UNRESERVED, path
    if mode in (MERGE_SLASHES, DECODE_AND_MERGE_SLASHES):
        assert "//" not in path
    if mode == DECODE_AND_MERGE_SLASHES:
        assert "%2F" not in path and "%5C" not in path
    else:  # an escaped slash is data, never a separator
        assert path.count("/") <= sent.count("/") + sent.count("\\")
