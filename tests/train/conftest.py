"""Fixtures of the training tests."""
import signal

import pytest


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler during each test, as in a terminal: a suite started in the background
    (``nohup``, ``cmd &``) inherits an ignored SIGINT, which the Ctrl-C tests (and the processes they
    start, which inherit it through exec) would otherwise see.  The previous handler is restored."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
