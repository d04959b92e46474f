"""Every file the project reads or writes goes through here: one writer, one safe loader, and the
checks each kind of file gets before anything uses it.

    atomic_write, write_json      the one writer (a temporary file, then a rename)
    load_file                     the one torch.load: weights_only, regular files only, one-line errors
    require                       a loaded dict's keys and their types/values, named in the error
    check_state_dict              weights against the model they are for: keys, shapes, dtypes, finite
    read_idx                      the MNIST idx format, sizes checked against the header
    check_output, same_file       an output path is writable and is none of the inputs, before any work
    RunLock, remove_stale_temporaries

Readers of each kind call these and return checked objects, so that callers never re-check:
checkpoints (checkpoint.read_classifier, checkpoint.read_denoiser), SBG fields
(sources.load_sbg_file), the nearest-neighbour cache (sources.cached_nearest), metrics.jsonl
(checkpoint.read_metrics), JSON results (read_json_object), official checkpoints (models.from_official). Bad input is a
UserError: the scripts print it as one `error:` line and exit non-zero.
"""
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat

try:
    import fcntl  # POSIX file locks (RunLock)
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch

from models import weights_problem


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit non-zero."""


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: one line saying what is saved and how to continue, exit status 130."""


# ----------------------------------------------------------------------------- writing
def write_failure(path, e):
    """The one line a failed write gets: a full disk or a file-size limit said as such (torch.save reports
    them as `[enforce fail at inline_container.cc:...] unexpected pos`), else the system's reason."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or \
        isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e).lower())
    if full:
        return UserError(f"could not write {path}: the disk is full or a file-size limit was reached; "
                         "free space (or raise the limit) and run again")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
    return UserError(f"could not write {path}: {reason}")


def atomic_write(path, obj=None, text=None, write=None):
    """The project's one writer: torch.save(obj), `text`, or write(temporary path) (a figure) to a
    temporary file, then rename, so a reader never sees half a file and a failed write keeps the
    previous file. A failed write (full disk, file-size limit, read-only folder) removes its
    temporary file and raises UserError naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if write is not None:
            write(tmp)
        elif text is None:
            torch.save(obj, tmp)
        else:
            with open(tmp, "w") as f:
                f.write(text)
        os.replace(tmp, path)
    except BaseException as e:  # noqa: BLE001 - a full disk, a bad value, or Ctrl-C: never a temporary left behind
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError, ValueError)):  # torch.save reports a full disk as a RuntimeError
            raise write_failure(path, e) from None
        raise


def save_figure(fig, path, **savefig_kw):
    """A matplotlib figure, atomically (its format from the path's suffix): a failed write keeps the
    previous figure."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    atomic_write(path, write=lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kw))


def write_json(obj, path):
    """JSON, atomically; NaN and infinity are refused (they are not JSON)."""
    atomic_write(path, text=json.dumps(obj, indent=2, allow_nan=False) + "\n")


def temporary_name(name):
    """The exact names atomic_write's temporaries of `name` have (NAME.tmp<pid>)."""
    return re.compile(re.escape(name) + r"\.tmp(\d+)")


def pid_alive(pid):
    """Whether a process with this pid may exist (a temporary of a live writer is not stale); a number no
    process can have counts as alive, so its file is left alone."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to signal, or no pid at all: leave its file
        return True
    return True


def remove_stale_temporaries(folder, names):
    """Delete temporaries of `names` in folder left by killed writers: only NAME.tmp<pid> of a pid that
    no longer runs, never a live writer's, nor another file that merely starts like one."""
    if os.path.isdir(folder):
        patterns = [temporary_name(n) for n in names]
        for f in os.listdir(folder):
            m = next(filter(None, (p.fullmatch(f) for p in patterns)), None)
            stale = os.path.join(folder, f)
            if m and os.path.isfile(stale) and not os.path.islink(stale) and not pid_alive(int(m.group(1))):
                try:
                    os.remove(stale)
                except FileNotFoundError:
                    pass


def file_sha256(path):
    """The content of a file, as results record which model or fields made them (read in blocks:
    fields files are gigabytes at CIFAR scale)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def same_file(a, b):
    """Whether two paths name one file (also through links or relative paths); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what a figure output may be called


def first_missing_folder(root):
    """The outermost folder of root's path that does not exist yet (None if root exists): a call that fails
    removes it again (remove_made_folder, folders_removed_if_failed), so no empty or half-written folder of it stays."""
    made, path = None, os.path.abspath(root)
    while not os.path.exists(path):
        made, path = path, os.path.dirname(path)
    return made


def remove_made_folder(made):
    """A failed download's folder: everything in it is that call's."""
    if made is not None and os.path.isdir(made):
        shutil.rmtree(made)


@contextlib.contextmanager
def folders_removed_if_failed(*paths):
    """Around a call that writes the files `paths`: the folders it makes for them (check_output probes them
    early) are removed again if it fails, as long as nothing was written into them."""
    made = [first_missing_folder(os.path.dirname(os.path.abspath(p))) for p in paths if p]
    try:
        yield
    except BaseException:
        for top in filter(None, made):
            for folder, subfolders, names in os.walk(top, topdown=False):
                if not names and not os.listdir(folder):
                    os.rmdir(folder)
        raise


def check_output(path, what, inputs=(), suffixes=None):
    """Before any long computation: refuse an output that is one of the inputs (it would be overwritten),
    has a suffix nobody writes, or cannot be written (its folder made and probed now)."""
    for other in inputs:
        if other and same_file(path, other):
            raise UserError(f"{what} {path} is also an input ({other}); choose another path")
    if suffixes and os.path.splitext(path)[1].lower() not in suffixes:
        raise UserError(f"{what} {path}: the suffix must be one of {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give a file name")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{what} {path} exists and is not a regular file")
    probe = f"{path}.tmp{os.getpid()}"
    atomic_write(probe, text="")  # makes the folder, or fails with the reason in one line
    os.remove(probe)


# ----------------------------------------------------------------------------- reading
def regular_file(path, what):
    """A path that must be an existing regular file (a FIFO or a device would hang or stream)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise UserError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file")
    return path


def load_file(path, what, map_location="cpu", mmap=False, with_sha256=False):
    """torch.load that never runs code from the file (weights_only=True: tensors, numbers,
    strings and containers only). A missing, truncated or foreign file is a UserError.
    mmap: tensors stay on disk until touched (a glance at a file of gigabytes).
    with_sha256: (object, sha256 of the very bytes it was loaded from): a file replaced in between
    can never pair one file's content with another's hash."""
    regular_file(path, what)
    try:
        if with_sha256:
            with open(path, "rb") as f:
                raw = f.read()
            return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True), hashlib.sha256(raw).hexdigest()
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        text = " ".join(str(e).split())
        first = text.split(". ")[0].rstrip(".") if text else type(e).__name__  # its first sentence, whole
        raise UserError(f"{path} is not a readable {what} ({first})") from None


def require(obj, fields, path, what):
    """Check a loaded dict: fields maps each required key to a type (or tuple of types), or to a
    function value -> bool. Returns obj. The first missing or wrong key is named in one line."""
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a {what} (a {type(obj).__name__}, not a dict)")
    for key, check in fields.items():
        if key not in obj:
            raise UserError(f"{path} is not a complete {what}: no {key!r}")
        value = obj[key]
        ok = isinstance(value, check) and not (check in (int, (int,)) and isinstance(value, bool)) \
            if isinstance(check, (type, tuple)) else check(value)
        if not ok:
            shown = f"a {type(value).__name__}" if torch.is_tensor(value) or isinstance(value, (dict, list)) else repr(value)[:60]
            raise UserError(f"{path}: {key!r} of this {what} is {shown}, which is not valid")
    return obj


def check_state_dict(model, state_dict, path, what):
    """Weights for `model` (models.weights_problem: keys, shapes, dtypes, finite), else one UserError naming
    the file and the first problem."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise UserError(f"{path}: the weights of this {what} are not a state dict")
    problem = weights_problem(model, state_dict)
    if problem:
        raise UserError(f"{path} ({what}): {problem}")


IDX_TYPES = {0x08: np.uint8}  # the only type the Fashion-MNIST / MNIST files use


def read_idx(path, what="idx file"):
    """An idx file (the MNIST format), gzipped or not, as a uint8 array; its header (magic, type,
    dimensions) is checked against the bytes that follow, so a truncated file is refused."""
    regular_file(path, what)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip: a truncated or non-gzip file
        raise UserError(f"{path} is not a readable {what} ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or not 1 <= raw[3] <= 4:
        raise UserError(f"{path} is not an {what} (bad header)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} is a truncated {what} (its header is cut)")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - 4 - 4 * ndim != size:
        raise UserError(f"{path}: its header says {shape} ({size} bytes) but {len(raw) - 4 - 4 * ndim} follow")
    return np.frombuffer(raw, dtype=IDX_TYPES[raw[2]], offset=4 + 4 * ndim).reshape(shape)


# ----------------------------------------------------------------------------- one run per folder
class RunLock:
    """One run per directory: FOLDER/run.lock, locked (flock) while the run lives, holding its pid.
    The kernel drops the lock when its process ends, however it ends, so a killed run's file
    is simply locked again, and of runs started together exactly one gets it. The file is
    opened without following a link: a planted run.lock symlink is refused, its target untouched."""

    def __init__(self, folder):
        self.path, self.fd, self.folder = os.path.join(folder, "run.lock"), None, folder
        self.made_folder = not os.path.isdir(folder)  # removed again if the run leaves nothing in it
        os.makedirs(folder, exist_ok=True)
        if fcntl is None:
            print("note: no POSIX file locks here; one run per directory is not enforced", flush=True)
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:  # ELOOP: a symbolic link
                raise UserError(f"{self.path} cannot be the run's lock file ({e.strerror}); remove it") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UserError(f"{self.path} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{folder} is in use by another run" + (f" (process {other})" if other else "") +
                                "; wait for it or choose another --out-dir") from None
            try:  # a run that just ended removed the file we opened: lock the one now at the path
                if os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:  # a full disk or a file-size limit: no lock file or folder of ours stays
            os.remove(self.path)
            os.close(fd)
            if self.made_folder and not os.listdir(folder):
                os.rmdir(folder)
            raise write_failure(self.path, e) from None
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.remove(self.path)  # while still locked: nobody locks a file that is on its way out
            os.close(self.fd)
            self.fd = None
        if self.made_folder and os.path.isdir(self.folder) and not os.listdir(self.folder):
            os.rmdir(self.folder)  # a run that failed before writing anything leaves no empty folder

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- results merged by several writers
def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_object(path, what):
    """A JSON file that must hold one object (a dict), checked; NaN and infinity are refused."""
    regular_file(path, what)
    try:
        with open(path) as f:
            obj = json.load(f, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{path} is not a valid {what} ({reason}); repair or move it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a {what} (it holds a {type(obj).__name__})")
    return obj


def update_json(path, merge, what):
    """Read, merge and write a JSON object while holding an exclusive lock on its folder, so that
    writers running at once (two attack.py on one checkpoint) never lose each other's entries.
    merge(old dict, {} if there is none) -> the new dict. Temporaries of this file left by a killed
    writer are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        remove_stale_temporaries(folder, (os.path.basename(path),))
        new = merge(read_json_object(path, what) if os.path.lexists(path) else {})
        write_json(new, path)
        return new
    finally:
        os.close(fd)
