"""The shared one-line helpers: quoting a library error (sra.errors.first_line) and choosing a
device (sra.devices.resolve_device)."""

import pytest
import torch

from sra.devices import resolve_device
from sra.errors import SraError, first_line


def test_first_line_of_text_skips_blank_lines_and_unsafe_advice():
    text = "\n  \n  Weights only load failed. Re-running with weights_only=False will work  \n" \
           "  Unsupported global: GLOBAL os.system  \nmore\n"
    assert first_line(text) == "Unsupported global: GLOBAL os.system"
    assert first_line("trusted source only\n") == ""  # nothing usable in text: empty
    assert first_line("a\nb", skip=()) == "a"
    assert first_line("x" * 300, limit=200) == "x" * 200


def test_first_line_of_an_exception():
    exc = RuntimeError("  bad header\nsecond line")
    assert first_line(exc) == "bad header"
    assert first_line(exc, with_type=True) == "RuntimeError: bad header"
    assert first_line(ValueError("")) == "ValueError"  # no usable line: the type names it
    assert first_line(ValueError("\n\n"), with_type=True) == "ValueError"
    assert first_line(OSError("use weights_only=False")) == "OSError"


def test_resolve_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device() == auto and resolve_device("auto") == auto
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named, not checked for presence
    assert resolve_device(torch.device("meta")) == torch.device("meta")
    with pytest.raises(SraError, match=r"unknown device 'gpu0'; allowed: auto, cpu, cuda"):
        resolve_device("gpu0")
