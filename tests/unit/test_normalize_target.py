"""``proxy.admission.normalize_target``: the path authorization matches and the app gets,
normalized as Istio's default (Envoy ``normalize_path``), so ``/admin*`` cannot be dodged
with dot segments or escapes."""

from __future__ import annotations

import pytest

from nodeagent.proxy.admission import normalize_target


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ("/admin", "/admin"),
        ("/./admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/admin/%2e%2e/secret", "/secret"),
        ("/a/b/..", "/a/"),
        ("/a/./b/.", "/a/b/"),
        ("/a%2fb", "/a%2Fb"),  # an escaped slash stays escaped (upper case)
        ("/q?x=/../y&%61", "/q?x=/../y&%61"),  # the query is not touched
        ("*", "*"),
        ("/bad%zz", None),
        ("/bad%4", None),
    ],
)
def test_normalize_target(target: str, want: str | None) -> None:
    assert normalize_target(target) == want
