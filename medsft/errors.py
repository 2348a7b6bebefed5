"""Errors meant for the user: a one-line message and a non-zero exit, never a traceback."""
import contextlib
import signal
import threading


class UserError(SystemExit):
    """Raise with a message for the user. Python prints it to stderr and exits with code 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DataError(UserError):
    """A problem in an input file, named by path and (1-based) line."""

    def __init__(self, path, line, problem: str, unit: str = "line"):
        where = f"{path}: {unit} {line}" if line else f"{path}"
        super().__init__(f"error: {where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


class Interrupted(SystemExit):
    """Ctrl-C, turned into one line saying where the run stopped and how to go on (exit code 130, as shells use)."""

    def __init__(self, message: str):
        super().__init__(130)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_on_interrupt(message: str, show: bool = True):
    """Print `message` instead of a KeyboardInterrupt traceback and exit with code 130 (`show`: the process that
    speaks, when several were interrupted together)."""
    import sys

    if show:
        print(f"\n{message}", file=sys.stderr, flush=True)
    raise Interrupted(message) from None


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C until the block ends, so a write it guards is whole; the held Ctrl-C is then raised.

    Only Python's own Ctrl-C handler is held: off the main thread (which receives no signals), with Ctrl-C
    ignored (a job started with `&`, nohup) or with another program's handler installed, this does nothing.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
