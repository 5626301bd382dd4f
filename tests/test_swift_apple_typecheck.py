"""The Swift written only for Apple platforms (the iOS app, FlashmeshPlatform's Metal compute and Bonjour
advertiser) type-checks here against stub modules of Apple's API and the real FlashmeshNode library
(mobile_export/ios/tools/apple-typecheck/run.sh says what that does and does not prove)."""

from __future__ import annotations

import subprocess

from flashmesh.testing.swift_node import PACKAGE


def test_apple_only_sources_type_check_against_the_stubs(swift_binary):
    result = subprocess.run(
        ["tools/apple-typecheck/run.sh"], cwd=PACKAGE, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "type-check against the stubs" in result.stdout
