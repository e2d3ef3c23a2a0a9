"""cnnlab: the CNN of the lecture "CNN Modules" on CIFAR-10, as a Lightning + Hydra experiment project."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, shapes that don't fit): the entry points print it in one line
    and exit non-zero, without a traceback. Programming errors keep their traceback."""


def write_atomically(path, content) -> None:
    """Write `content` (bytes, or a function that writes to a binary file) to a temp file beside `path`, then
    rename it over `path`: a reader sees the old file or the new one, never half of one, even if we are killed."""
    import os
    from pathlib import Path

    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            content(file) if callable(content) else file.write(content)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
