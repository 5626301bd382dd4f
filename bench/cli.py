"""Subcommands added to `flashmesh` by this part of the project."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's subcommands to the `flashmesh` parser (none yet)."""
