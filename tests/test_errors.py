"""ctrl_c_deferred: a Ctrl-C inside the block is held until the block ends, then raised."""

from __future__ import annotations

import os
import signal

import pytest

from fewtune.errors import ctrl_c_deferred


def test_ctrl_c_inside_the_block_is_raised_after_it() -> None:
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished = True  # the block was not cut short
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_only_default_handler_leaves_an_ignored_sigint_alone() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_deferred(only_default_handler=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised
    finally:
        signal.signal(signal.SIGINT, previous)
