"""What every script shares at run time: one-line errors, interrupts, safe files, logs, figures,
the results format, datasets.

Each script keeps its own method; this module only holds what would otherwise be copied
between them. It imports no other module of the project, so every module may import it.

Why TensorFlow is imported late: importing it takes seconds and prints C++ start-up lines.
Every module of the project imports TensorFlow and Keras inside the functions that need
them, never at the top, so that --help, a config mistake or a bad path answers in a
fraction of a second with one line (tests/test_layout.py checks it). The first import,
wherever it happens, goes through _QuietTensorFlowImport below.
"""
import atexit
import contextlib
import gc
import importlib.abc
import importlib.util
import itertools
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent

class UserError(ValueError):
    """A mistake the user can fix; scripts print it as one line and exit non-zero."""


# Folders that ensure_writable_dir created in this run: a run that fails removes the
# ones it left empty, so a mistake leaves nothing behind.
_CREATED_DIRS = []


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


class InterruptsDeferred:
    """Within the block, a first Ctrl-C or SIGTERM is only noted (and message printed); a second aborts.

    Outside the main thread (where Python cannot set signal handlers) it changes nothing.
    """

    def __init__(self, message="interrupted: finishing the save (interrupt again to abort it; "
                               "no file is left half-written)"):
        self.message, self.interrupted, self.previous = message, False, {}

    def __enter__(self):
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._note) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print(self.message)

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        return False


def run_cli(main):
    """Run a script's main(), turning user mistakes into one line and an exit code.

    SIGTERM (a scheduler's kill) is handled like Ctrl-C: whatever main saves on an
    interrupt is saved, temporary files are removed, and the exit code is 130.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _CREATED_DIRS.clear()
    code = 1
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        if code:
            _remove_empty_created_dirs()
    # Python's last garbage collections walk every object TensorFlow and Keras made: 0.9 s
    # at every exit. Frozen objects are skipped; whatever was not closed by now is still
    # closed as its module goes (reference counting), and atexit handlers still run.
    atexit.register(gc.freeze)
    sys.exit(code)


def _remove_empty_created_dirs():
    for path in reversed(_CREATED_DIRS):
        try:
            path.rmdir()  # Only an empty folder goes; anything written stays.
        except OSError:
            pass


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Silence the C++ start-up lines TensorFlow writes to stderr while it is imported.

    TensorFlow 2.21 prints them through absl before TF_CPP_MIN_LOG_LEVEL is read, so the
    only way to keep a one-line error one line is to point file descriptor 2 elsewhere
    for the import itself. Python errors raised by the import still reach stderr.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # Only the first import; find the real spec below.
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilencedLoader(spec.loader)
        return spec


class _SilencedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # No real stderr (an embedding host): import as is.
            return self.loader.exec_module(module)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Later C++ info lines, for versions that read it.
if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())


# ------------------------------------------------------------------------------ files


def shown(value, limit=60):
    """value as an error message shows it, in at most about limit characters whatever a file holds.

    A crafted file's int may have a million digits (repr refuses those) and its string a
    billion characters; containers are described, not printed.
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return repr(value)


def shortened(text, limit=160):
    """text for a message: as given, or its start and its length where it is longer than limit."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown_path(path):
    """A user's path for a message, at most about 160 characters (a config may name a 10 MB one)."""
    return shortened(str(path))


def _stat(path, what, fix):
    """os.stat(path), None where nothing is there; a name the system cannot take is one line."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # A NUL character: no file system takes it.
        raise UserError(f"{what} {shown_path(repr(str(path)))} holds a NUL character; {fix}") from None
    except OSError as error:  # A name too long, a loop of links, a folder that cannot be entered.
        raise UserError(f"{what} {shown_path(path)} cannot be reached ({error.strerror}); {fix}") from None


def checked_input(path, what, fix, folder=False):
    """path as a Path once it names an existing regular file (or folder, with folder=True); else one line.

    Every command checks each path a user gives it here before reading it, so that a name
    too long for the system, a folder where a file belongs, or a device or pipe that would
    never end (/dev/zero, a FIFO) is "<what> <path> ...; <fix>", never a traceback or a hang.
    """
    status = _stat(path, what, fix)
    if status is None:
        raise UserError(f"{what} {shown_path(path)} does not exist; {fix}")
    if stat.S_ISDIR(status.st_mode) != folder:
        raise UserError(f"{what} {shown_path(path)} is {'not a folder' if folder else 'a folder'}; {fix}")
    if not folder and not stat.S_ISREG(status.st_mode):
        raise UserError(f"{what} {shown_path(path)} is not a regular file (a device, a pipe or a socket); {fix}")
    return Path(path)


def read_input(path, what, fix, max_bytes):
    """The bytes of a user's file (checked_input), at most max_bytes of them; one line if it cannot be read.

    The size is checked from the file's status before anything is read, and again as it is read:
    a /proc file says 0 bytes whatever it holds, and some (/proc/self/pagemap) refuse to be read.
    """
    path = checked_input(path, what, fix)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            chunks = [file.read(size + 1) if size <= max_bytes else b""]  # One read of the size it says.
            total = max(size, len(chunks[0]))
            while total <= max_bytes and chunks[-1]:  # A file longer than it says: in chunks, up to the limit.
                chunks.append(file.read(1 << 20))
                total += len(chunks[-1])
    except OSError as error:
        raise UserError(f"cannot read {what} {shown_path(path)} ({error.strerror}); {fix}") from None
    if total > max_bytes:
        raise UserError(f"{what} {shown_path(path)} holds more than {max_bytes} bytes, more than a {what} "
                        f"holds; {fix}")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(temporary_path), then rename it over path, so readers never see half a file.

    The file gets the permissions the user's umask gives a new file (mkstemp's 0600 would
    hide results from the user's group), and an interrupted write leaves no temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix: Keras and matplotlib pick the format from it.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
        os.close(handle)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # A full disk or a folder made read-only: the old file is intact.
            raise _write_error(path, error) from None
        raise


def _write_error(path, error):
    reason = error.strerror or str(error).splitlines()[0]
    return UserError(f"cannot write {shown_path(path)} ({reason}); free some space or fix the folder's permissions "
                     "and run again (any earlier version of the file is unchanged)")


def atomic_write_bytes(path, data):
    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    atomic_write(path, write)


def _json_safe(value):
    """NaN and infinity become None: strict JSON readers refuse a bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path, value):
    atomic_write_bytes(path, (json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n").encode())


def ensure_writable_dir(path):
    """Create the output folder if needed and check that a file can be written there.

    A folder created here is removed again if the command then fails and leaves it empty.
    """
    path = Path(path)
    status = _stat(path, "output folder", "choose another with --out")
    if status is not None and not stat.S_ISDIR(status.st_mode):
        raise UserError(f"output folder {shown_path(path)} is a file; choose another with --out")
    missing = [folder for folder in [path, *path.parents] if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        _CREATED_DIRS.extend(reversed(missing))
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"cannot write to output folder {shown_path(path)} ({error.strerror}); "
                        "choose another with --out") from None
    return path


# ------------------------------------------------------------------------ TensorBoard


# Writers that received a summary: a writer that received none leaves no file behind.
_USED_WRITERS = weakref.WeakSet()


@contextlib.contextmanager
def summary_writer(log_dir):
    """A TensorBoard event-file writer for log_dir, flushed and closed however the block ends (Ctrl-C too).

    A block that wrote nothing (a run that failed before its first progress line) removes
    the empty event file, and log_dir if it made it, so a failed start leaves no folder.
    """
    import tensorflow as tf

    log_dir = Path(log_dir)
    created = [folder for folder in [log_dir, *log_dir.parents] if not folder.exists()]
    before = set(log_dir.glob("events.out.tfevents.*"))
    writer = tf.summary.create_file_writer(str(log_dir))
    try:
        yield writer
    finally:
        writer.close()
        if writer not in _USED_WRITERS:
            for path in set(log_dir.glob("events.out.tfevents.*")) - before:
                path.unlink(missing_ok=True)
            for folder in created:  # The innermost first: only empty folders go.
                with contextlib.suppress(OSError):
                    folder.rmdir()


def session_log_dir(log_root):
    """A fresh subfolder of log_root for this session's event files (log_root/<date-time>, -2 on a clash):
    TensorBoard shows each run or resumed session of a folder as its own run, never merged."""
    log_root, stamp = Path(log_root), time.strftime("%Y%m%d-%H%M%S")
    candidates = (log_root / (stamp if count == 1 else f"{stamp}-{count}") for count in itertools.count(1))
    return next(path for path in candidates if not path.exists())


def _summary_metadata(plugin_name):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name))


# tf.summary.scalar and tf.summary.image live in the tensorboard package, which only reading
# the logs needs; tf.summary.write with TensorBoard's plugin metadata writes the same records.


def write_scalars(writer, step, values):
    """Each {tag: number} at step, for TensorBoard's scalars tab (None is left out); no writer, no-op."""
    import tensorflow as tf

    if writer is None:
        return
    _USED_WRITERS.add(writer)
    with writer.as_default(step=int(step)):
        for tag, value in values.items():
            if value is not None:
                tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=_summary_metadata("scalars"))
    writer.flush()


def write_images(writer, step, tag, images):
    """Images (N, H, W[, C]) in [0, 1], grey or colour, for TensorBoard's images tab; no writer, no-op."""
    import tensorflow as tf

    if writer is None:
        return
    _USED_WRITERS.add(writer)
    images = tf.image.convert_image_dtype(with_channel(np.asarray(images, np.float32)), tf.uint8, saturate=True)
    encoded = [tf.image.encode_png(image) for image in images]
    height, width = images.shape[1:3]
    with writer.as_default(step=int(step)):  # TensorBoard's layout: width, height, then one PNG per image.
        tf.summary.write(tag, tf.stack([str(width), str(height), *encoded]), metadata=_summary_metadata("images"))
    writer.flush()


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; imported only where a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as module

    return module


def save_figure(figure, path):
    """Save a figure as PNG atomically and free it."""
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight"))
    finally:
        pyplot().close(figure)


def with_channel(images):
    """Grey images (N, H, W), as results files hold them, as (N, H, W, 1) for a model."""
    return images[..., None] if images.ndim == 3 else images


def format_seconds(seconds):
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
