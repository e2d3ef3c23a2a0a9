"""cnnlab's base, below every room: UserError, atomic writes (metrics.json too), instantiate with our errors, CHANNELS.

cnnlab: the CNN of the lecture "CNN Modules" on CIFAR-10, as a Lightning + Hydra experiment project. The map of
its rooms is docs/design.md.
"""

# data.channels → the network's input channels: colour or grey images (conf/model/slide_cnn.yaml follows it)
CHANNELS = {"RGB": 3, "L": 1}


class UserError(Exception):
    """A mistake the user can fix (a bad path, shapes that don't fit): the entry points print it in one line
    and exit non-zero, without a traceback. Programming errors keep their traceback."""


def write_atomically(path, content) -> None:
    """Write `content` (bytes, or a function that writes to a binary file) to a temp file beside `path`, then
    rename it over `path`: a reader sees the old file or the new one, never half of one, even if we are killed.
    A write the file system refuses (no space left, a quota, read-only) is a UserError naming the path; the old
    file, if any, is still whole."""
    import contextlib
    import os
    from pathlib import Path

    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            content(file) if callable(content) else file.write(content)
        os.replace(temp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    except RuntimeError as err:  # torch.save, when a write of its zip fails, raises its own error over the OSError
        cause = err.__context__ if isinstance(err.__context__, OSError) else None
        if cause is None and "PytorchStreamWriter failed" not in str(err):
            raise
        raise UserError(f"cannot write {path}: {cause.strerror if cause else disk_problem(path.parent)}") from err
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def disk_problem(folder) -> str:
    """Why a write failed where torch does not say: the free space of the folder's file system."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError as err:
        return err.strerror or str(err)
    return f"the write failed with {free / 2**20:,.1f} MiB free there (no space left, or a quota?)"


def make(node, **kwargs):
    """hydra.utils.instantiate, with our UserError let through as it is (Hydra wraps what a target raises)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def write_metrics(metrics: dict, output_dir) -> dict:
    """<run dir>/metrics.json, written atomically: a reader never sees half of it."""
    import json
    from pathlib import Path

    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
