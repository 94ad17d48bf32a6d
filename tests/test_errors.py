"""errors.first_line: what every one-line UserError quotes of another library's error."""

from __future__ import annotations

from loracompose.errors import first_line


def test_first_line_keeps_the_first_line_caps_its_length_and_names_empty_errors():
    assert first_line(ValueError("  bad header\nTraceback details\n")) == "bad header"
    assert first_line(OSError("x" * 500)) == "x" * 300
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   \n  ")) == "RuntimeError"
