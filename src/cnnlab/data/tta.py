"""Test-time augmentation (data.tta): the views of each test image a trained network is asked about, and their weights.

- flip: the image and its mirror image, half each. Training flips images, so a mirrored image is as likely as the
  image itself, and the mean of the two views' logits is a better guess than either alone.
- flip_translate (airbench's): half the weight to those two, half to the same two shifted by one pixel, up-left
  and down-right (the border reflected, as in a padded crop), an eighth each.
- translate: for images whose mirror image is another class (digits, data.flip=false): the image, half, and the two
  shifted views, a quarter each.

The views are index lists over the last two axes (height, width) of an N×C×H×W batch, so the same code serves
torch tensors (the run's test) and numpy arrays (eval.py), uint8 or float.
"""

TTA_MODES = ("flip", "flip_translate", "translate")


def tta_mode(value: bool | str | None) -> str | None:
    """data.tta's value as a mode: true is `flip` (what data.tta=true has always meant), false/null none."""
    if value is True:
        return "flip"
    return value or None


def shifted(length: int, shift: int) -> list[int]:
    """The pixel each output pixel takes along one axis, the content moved by `shift` (±1), reflected at the border:
    shift +1 → [1, 0, 1, 2, …, L−2], shift −1 → [1, 2, …, L−1, L−2]."""
    return [abs(i - shift) if i - shift < length else 2 * (length - 1) - (i - shift) for i in range(length)]


def views(height: int, width: int, mode: str) -> list[tuple[float, list[int], list[int]]]:
    """(weight, rows, columns) of each view; the weights add up to 1, the first view is the image itself."""
    rows, cols, mirrored = list(range(height)), list(range(width)), list(range(width - 1, -1, -1))
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}: one of {TTA_MODES}")  # the config's domain refuses it first
    with_mirror = mode != "translate"
    pair = [(0.5, rows, cols), (0.5, rows, mirrored)] if with_mirror else [(1.0, rows, cols)]
    if mode == "flip":
        return pair
    moved = []
    for shift in (1, -1):
        r, c = shifted(height, shift), shifted(width, shift)
        pairs = [(r, c), (r, [c[i] for i in mirrored])] if with_mirror else [(r, c)]  # the view, its mirror image
        moved += [(0.5 / (2 * len(pairs)), r, c) for r, c in pairs]
    return [(w / 2, r, c) for w, r, c in pair] + moved


def tta_logits(logits_of, images, mode: str, logits=None):
    """The weighted mean of the views' logits; `logits` (the image's own, already computed) saves one pass."""
    total = None
    for i, (weight, rows, cols) in enumerate(views(images.shape[-2], images.shape[-1], mode)):
        view_logits = logits if i == 0 and logits is not None else logits_of(images[..., rows, :][..., cols])
        view_logits = view_logits.float()  # the sum in float32, whatever the autocast's logits
        total = weight * view_logits if total is None else total + weight * view_logits
    return total
