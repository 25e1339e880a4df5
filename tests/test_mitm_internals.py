"""The one module touching mitmproxy internals: fails loudly if an upgrade moves them."""

from __future__ import annotations

import mitmproxy.version

from wirefault.proxy import mitm_internals


def test_internals_used_for_rst_are_still_there():
    mitm_internals.check_compatible()


def test_mitmproxy_version_is_a_known_one():
    major = int(mitmproxy.version.VERSION.split(".")[0])
    assert 11 <= major < 13, mitmproxy.version.VERSION
