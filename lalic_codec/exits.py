"""How every ``codec`` command ends: the one error path (:func:`exit_codes`) and the signals that
interrupt a command like Ctrl-C does (:func:`signals_interrupt`).

A low-level module (click and the standard library only), used by every command: ``codec encode``,
``decode``, ``info``, ``bench``, ``batch`` and ``train``.  The exit codes are those of the error
classes (:mod:`lalic_codec.errors`, README "Exit status").
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

import click

from .errors import CodecError, Interrupted

#: the signals that interrupt a command (exit status 130): Ctrl-C and the termination signals
INTERRUPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def fail(err: BaseException) -> int:
    """Print ``err`` as one line on stderr and return its exit code (1 for what is no CodecError: a bug).
    An :class:`~lalic_codec.errors.Interrupted` is a stop that was asked for: ``codec: interrupted: ...``."""
    if isinstance(err, Interrupted):  # a requested stop (Ctrl-C, kill), worded as one, not as a failure
        click.echo(f"codec: interrupted: {err}", err=True)
        return err.exit_code
    if isinstance(err, CodecError):
        click.echo(f"codec: error: {err}", err=True)
        return err.exit_code
    if os.environ.get("LALIC_DEBUG"):
        raise err
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    click.echo(f"codec: internal error: {type(err).__name__}: {detail} (set LALIC_DEBUG=1 for a traceback)", err=True)
    return 1


@contextmanager
def exit_codes():
    """The one error path of the commands, a context manager or a decorator: click's own errors stay
    click's (a usage error: exit 2), Ctrl-C exits 130, anything else becomes its one-line message
    and documented exit code (:func:`fail`)."""
    try:
        yield
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        click.echo("codec: interrupted", err=True)
        sys.exit(Interrupted.exit_code)
    except Exception as e:
        sys.exit(fail(e))


@contextmanager
def signals_interrupt():
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt like Ctrl-C does, so that the same cleanup runs
    (temporary file removed, exit status 130); the previous handlers are restored afterwards."""
    old = {}
    for sig in INTERRUPT_SIGNALS:
        if sig == signal.SIGINT:  # raises KeyboardInterrupt already
            continue
        try:
            old[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
