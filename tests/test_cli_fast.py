"""The command line's own checks: the parser loads no torch, a bad --out-dir fails at once, and an
interrupt (SIGINT, or SIGTERM from a launcher) ends with the resume hint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatie.tools.preflight import check_out_dir
from megatie.tools.train_cli import INTERRUPTED, run_main
from megatie.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launchers", "train_gpt2.py")
HEAVY = ("torch", "transformers", "deepspeed", "numpy")


def _python(*args, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_parser_and_validation_import_nothing_heavy():
    code = ("import sys; from megatie.tools.train_cli import build_parser, config_from_args; "
            "config_from_args(build_parser().parse_args(['--preset', 'gpt2'])).resolved(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_help_and_flag_errors_answer_quickly(tmp_path):
    t0 = time.time()
    r = _python(LAUNCHER, "--help")
    assert r.returncode == 0 and "--tie-policy" in r.stdout and "alternate" in r.stdout
    r = _python(LAUNCHER, "--tie-policy", "telepathy", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    # Each takes about 0.2 s; with torch imported it was 10 s or more. The bound leaves room for a busy machine.
    assert time.time() - t0 < 10


def test_choices_are_re_exported_where_they_used_to_live():
    """Each choice is defined once, as plain data, and the modules that implement it re-export it."""
    from megatie import config, presets
    from megatie.tying import agent, layers, options, policies

    assert agent.REWARDS is options.REWARDS and agent.REWARD_NORMS is options.REWARD_NORMS
    assert agent.MOVES is options.MOVES and layers.TIE_MODES is options.TIE_MODES
    assert policies.POLICIES is options.POLICIES and config.PRESETS is presets.PRESETS


def test_check_out_dir(tmp_path):
    nested = tmp_path / "a" / "b"
    check_out_dir(str(nested))
    assert nested.is_dir()
    check_out_dir(str(nested))  # an existing directory is fine
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"{afile} exists and is not a directory"):
        check_out_dir(str(afile))
    with pytest.raises(ConfigError, match=f"cannot create --out-dir {afile}/run"):
        check_out_dir(str(afile / "run"))
    with pytest.raises(ConfigError, match="must not be empty"):
        check_out_dir("")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_out_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=str(ro / "run")):
            check_out_dir(str(ro / "run"))
        with pytest.raises(ConfigError, match="not writable"):
            check_out_dir(str(ro))
    finally:
        ro.chmod(0o755)


def test_bad_out_dir_fails_before_torch_loads(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    t0 = time.time()
    r = _python(LAUNCHER, "--out-dir", str(afile))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"error: --out-dir {afile} exists and is not a directory; choose another path"]
    assert time.time() - t0 < 10


def test_sigterm_becomes_the_interrupt_hint(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def terminated(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises during the sleep
        finally:
            # A second SIGTERM while unwinding (the launcher's, after a Ctrl-C) changes nothing.
            os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    assert run_main(terminated) == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"
    assert signal.getsignal(signal.SIGTERM) is before  # put back once run_main returns


def test_keyboard_interrupt_hint(capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(interrupted) == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
