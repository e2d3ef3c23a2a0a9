"""cnnlab: the CNN of the lecture "CNN Modules" on CIFAR-10, as a Lightning + Hydra experiment project."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, shapes that don't fit): the entry points print it in one line
    and exit non-zero, without a traceback. Programming errors keep their traceback."""
