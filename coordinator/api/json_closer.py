"""The shortest text that closes a compact JSON document cut anywhere: what the grammar processor
writes when the token budget would otherwise end a JSON output before it parses."""

from __future__ import annotations

LITERALS = (b"true", b"false", b"null")
# What the innermost container still needs, by (container, state), before its closing bracket.
NEEDS = {
    ("{", "first"): "", ("{", "key"): '"":0', ("{", "colon"): ":0", ("{", "value"): "0", ("{", "more"): "",
    ("[", "first"): "", ("[", "value"): "0", ("[", "more"): "",
}  # fmt: skip


class JsonCloser:
    """Follows JSON as it is written (bytes; what comes before the first `{` or `[` is skipped) and
    says how to close it (`closing()`). Values it has to invent: 0 for a value, "" for a key.

    Container states: object "first" (just opened), "key" (after a comma), "colon" (after a key),
    "value" (after a colon), "more" (after a value); array "first", "value" (after a comma), "more"."""

    def __init__(self) -> None:
        self.stack: list[list[str]] = []  # [container, state] of the open containers, outermost first
        self.in_string = self.escaped = False
        self.hex_left = 0  # hex digits a \u escape still needs
        self.word = b""  # a number or literal being written
        self.started = self.ended = False

    def feed(self, data: bytes) -> None:
        for byte in data:
            self._char(bytes([byte]))

    def _char(self, c: bytes) -> None:
        if self.ended:
            return
        if self.in_string:
            self._string_char(c)
            return
        if not self.started:
            if c in (b"{", b"["):
                self.started = True
                self.stack.append([c.decode(), "first"])
            return
        if self.word:
            if c not in b'{}[],:" \t\n\r':
                self.word += c
                return
            self.word = b""
            self._value_done()
        if c in (b"{", b"["):
            self.stack.append([c.decode(), "first"])
        elif c in (b"}", b"]"):
            self.stack.pop()
            self.ended = not self.stack
            self._value_done()
        elif c == b'"':
            self.in_string = True
        elif c == b":":
            self.stack[-1][1] = "value"
        elif c == b",":
            self.stack[-1][1] = "key" if self.stack[-1][0] == "{" else "value"
        elif c not in b" \t\n\r":
            self.word = c

    def _string_char(self, c: bytes) -> None:
        if self.hex_left:
            self.hex_left -= 1
        elif self.escaped:
            self.escaped = False
            self.hex_left = 4 if c == b"u" else 0
        elif c == b"\\":
            self.escaped = True
        elif c == b'"':
            self.in_string = False
            self._value_done()

    def _value_done(self) -> None:
        """A string, number, literal or container ended: in an object it was a key or a value."""
        if self.stack:
            top = self.stack[-1]
            top[1] = "colon" if top[0] == "{" and top[1] in ("first", "key") else "more"

    def closing(self) -> str:
        """The shortest text that makes what was fed a complete document ("" once it is one)."""
        if self.ended or not self.started:
            return ""
        out = ""
        container, state = self.stack[-1]
        if self.in_string:
            out += ("n" if self.escaped else "0" * self.hex_left) + '"'
            state = "colon" if container == "{" and state in ("first", "key") else "more"
        elif self.word:
            literal = next((w for w in LITERALS if w.startswith(self.word)), None)
            if literal is not None:
                out += literal[len(self.word) :].decode()
            elif self.word[-1:] in (b"-", b"+", b".", b"e", b"E"):
                out += "0"
            state = "more"
        out += NEEDS[(container, state)]
        return out + "".join("}" if c == "{" else "]" for c, _ in reversed(self.stack))
