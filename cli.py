"""Command lines: every script's entry point (one `error:` line, never a traceback), its argparse
parser, and the number types its flags parse (fractions such as 8/255 included). Imports only files.py.
"""
import argparse
import math
import signal
import sys
import threading
import time

import files
from files import UserError


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(main):
    """Every script's entry point: a UserError (or a failed file operation) becomes one
    `error: ...` line on stderr and exit status 1, never a traceback; Ctrl-C one `interrupted:`
    line and exit status 130. SIGTERM (what clusters and `kill` send) ends a script as Ctrl-C does."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        main()
    except files.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: nothing more was written", file=sys.stderr, flush=True)
        sys.exit(130)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # unreadable input, read-only or full disk, no network
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        sys.exit(f"error: {e.strerror or e}{where}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default in its help: the value, or the
    help's own "default: ..." where it depends on the dataset or architecture."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit status 2) and defaults shown in --help."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, check, what):
    def parse(text):
        try:
            if kind is float and text.count("/") == 1:  # a fraction, as papers write radii: 8/255
                num, den = (float(part) for part in text.split("/"))
                value = num / den
            else:
                value = kind(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number" + (" (or a fraction such as 8/255)"
                                                                             if kind is float else "")) from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
# Upper bounds where a larger value only overflows float32 (or memory) deep inside a run.
radius = _number(float, lambda v: 0 <= v <= 1e6, "a finite radius in [0, 1e6] (larger ones overflow float32 in the attack)")
step_size = _number(float, lambda v: 0 < v <= 1e6, "a finite step in (0, 1e6] (larger ones overflow float32 in the attack)")
learning_rate = _number(float, lambda v: 0 < v <= 1e6, "a finite learning rate in (0, 1e6] (larger ones overflow float32)")
weight_decay = _number(float, lambda v: 0 <= v <= 1e6, "a finite weight decay in [0, 1e6] (larger ones overflow float32)")
loss_weight = _number(float, lambda v: 0 <= v <= 1e6, "a finite weight in [0, 1e6] (larger ones overflow float32)")
seed = _number(int, lambda v: 0 <= v < 2 ** 32, "a seed in 0..2^32-1")
image_side = _number(int, lambda v: 1 <= v <= 1024, "an image side in 1..1024 px (larger ones exhaust memory)")


def fractions(text):
    """'0.5,0.75' (or '1/2,3/4', as every other number flag takes them) -> [0.5, 0.75]: points of training,
    each strictly inside (0, 1); '' -> []."""
    def one(part):
        num, _, den = part.partition("/")
        return float(num) / float(den) if den else float(num)
    try:
        values = [one(f) for f in text.split(",") if f.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fractions") from None
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every fraction must be in (0, 1), got {text}")
    return values


# ----------------------------------------------------------------------------- progress
class Progress:
    """The project's one progress printer: `what done/total unit [extra] | rate unit/s | ETA`, on
    every `every`-th call, at the end, and whenever `seconds` have passed (so the first line
    comes within ~10 s of the start however slow the job)."""

    def __init__(self, what, total, unit="img", every=None, seconds=10.0, print_fn=print):
        self.what, self.total, self.unit, self.every, self.seconds, self.print = what, total, unit, every, seconds, print_fn
        self.start = self.last = time.time()
        self.calls = 0

    def __call__(self, done, extra="", later_seconds=0.0):
        """done: items finished so far; extra: text to show; later_seconds: time of the work after this job."""
        self.calls += 1
        now = time.time()
        if not (done >= self.total or now - self.last >= self.seconds or (self.every and self.calls % self.every == 0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        later = f" (then {later_seconds / 60:.1f} min more)" if later_seconds > 0 else ""
        self.print(f"{self.what} {done}/{self.total} {self.unit} {extra}| {rate:.{0 if rate >= 10 else 2}f} {self.unit}/s | "
                   f"ETA {eta:.0f}s{later}", flush=True)
