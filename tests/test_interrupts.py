"""An interrupt that Python swallows (raised inside a destructor) still ends the run."""

import os
import signal
import time

import pytest

from megatie.runtime.interrupts import interrupts_end_the_run, raise_if_requested

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost raise, on purpose
from megatie.trainer import Trainer
from test_trainer import small_config


class _SignalsInItsDestructor:
    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        time.sleep(0.05)  # the handler runs here, inside __del__, and its exception is dropped


def _lose_an_interrupt(sig):
    _SignalsInItsDestructor(sig)  # collected at once: the signal arrives during __del__


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_swallowed_interrupt_is_raised_at_the_next_check(sig):
    with interrupts_end_the_run():
        _lose_an_interrupt(sig)  # no exception escapes: Python printed "Exception ignored in ..."
        with pytest.raises(KeyboardInterrupt):
            raise_if_requested()
    raise_if_requested()  # the request does not outlive the block


def test_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interrupts_end_the_run():
        pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_trainer_stops_at_the_step_after_a_lost_interrupt(tmp_path, cache_dir):
    trainer = Trainer(small_config(tmp_path / "run", cache_dir, max_steps=8, save_checkpoints=False))
    trainer.train(until=2)
    with interrupts_end_the_run():
        _lose_an_interrupt(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert trainer.step == 2


def test_an_interrupt_inside_a_destructor_waits_for_the_step_boundary():
    """Raised inside ``__del__``, Python would print "Exception ignored" with a traceback and drop it."""
    import signal
    import sys

    from megatie.runtime import interrupts

    seen = {}

    class Finalised:
        def __del__(self):
            try:
                interrupts._on_sigint(signal.SIGINT, sys._getframe())
                seen["raised"] = False
            except KeyboardInterrupt:
                seen["raised"] = True

    interrupts._requested.clear()
    try:
        Finalised()  # dropped at once: its destructor receives the "signal"
        assert seen == {"raised": False} and interrupts._requested.is_set()
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_requested()
        with pytest.raises(KeyboardInterrupt):  # anywhere else it raises at once
            interrupts._on_sigint(signal.SIGINT, sys._getframe())
    finally:
        interrupts._requested.clear()
