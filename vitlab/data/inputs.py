"""What prediction does to an image that is not like the training data, said in one line.

`vitlab predict` reads any image file and converts it to the model's channels and size; a digits
model (8x8 grey) given a 240x180 colour photo still answers with a confident class. The note lets
the user see that the answer is about a very different picture from the one they passed.
"""
from __future__ import annotations

from pathlib import Path

# a side scaled by this factor or more (down or up) is "resized a lot"
LARGE_RESIZE = 4.0
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _is_colour(im) -> bool:
    """True when the image has colour pixels (an RGB file whose three bands are equal is grey)."""
    from PIL import ImageChops

    if im.mode in _GREY_MODES:
        return False
    r, g, b = im.convert("RGB").split()
    return ImageChops.difference(r, g).getbbox() is not None or ImageChops.difference(g, b).getbbox() is not None


def describe_input_conversion(path: str | Path, img_size: int | tuple[int, int], in_chans: int,
                              large_resize: float = LARGE_RESIZE) -> str | None:
    """A one-line note when preparing the image at `path` for a model trained on `in_chans`-channel
    `img_size` images changes it a lot: colour converted to grey (or grey to colour), or a side
    resized by `large_resize` times or more. None when the image is like the training data (or
    cannot be read: reading it is the caller's job, with its own error)."""
    from PIL import Image, UnidentifiedImageError

    th, tw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    try:
        with Image.open(path) as im:
            w, h = im.size
            colour = _is_colour(im) if in_chans == 1 else im.mode not in _GREY_MODES
            kind = "RGB" if im.mode not in _GREY_MODES else "grey"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    channels_changed = (in_chans == 1 and colour) or (in_chans == 3 and not colour)
    factor = max(w / tw, tw / w, h / th, th / h)
    if not channels_changed and factor < large_resize:
        return None
    what = "grey" if in_chans == 1 else "RGB"
    return (f"note: {Path(path).name} is {w}x{h} {kind}; converted to {in_chans}-channel ({what}) {tw}x{th} "
            f"as the model was trained on")
