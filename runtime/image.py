"""Resolution binning, resize-back and post-processing in NumPy (docs/SANA_SPRINT_SPEC.md §3.1, §5.3, §5.4)."""

from __future__ import annotations

import numpy as np



def _bilinear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear, align_corners=False, no antialias."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """F.interpolate(x, (height, width), mode='bilinear', align_corners=False) for NCHW float32."""
    h0, h1, hw0, hw1 = _bilinear_taps(x.shape[2], height)
    w0, w1, ww0, ww1 = _bilinear_taps(x.shape[3], width)
    rows = x[:, :, h0, :] * hw0[None, None, :, None] + x[:, :, h1, :] * hw1[None, None, :, None]
    return rows[:, :, :, w0] * ww0 + rows[:, :, :, w1] * ww1


def resize_and_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover (height, width), then centre-crop: diffusers' resize_and_crop_tensor."""
    in_h, in_w = x.shape[2], x.shape[3]
    if (in_h, in_w) == (height, width):
        return x
    ratio = max(height / in_h, width / in_w)
    rh, rw = int(in_h * ratio), int(in_w * ratio)
    x = resize_bilinear(x, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[:, :, top:top + height, left:left + width]


def postprocess(x: np.ndarray, output_type: str):
    """[-1, 1] NCHW → 'np' NHWC float32 in [0, 1], or a list of PIL images."""
    x = np.clip(x * np.float32(0.5) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
    if output_type == "np":
        return x
    from PIL import Image

    return [Image.fromarray(img) for img in (x * 255).round().astype(np.uint8)]


# ---- img2img input: diffusers' VaeImageProcessor.preprocess, in NumPy ---------------------------------

def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """torch's 'nearest' (legacy) source indices: floor(dst * in/out) in float32, clamped."""
    scale = np.float32(in_size / out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """F.interpolate(x, (height, width)) with torch's default mode 'nearest', NCHW."""
    return x[:, :, _nearest_index(x.shape[2], height)][:, :, :, _nearest_index(x.shape[3], width)]


def load_image_file(path, name: str = "image") -> "object":
    """A PIL image from a file, or a typed error naming it (missing, unreadable)."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from sprintrt.errors import InvalidInputError

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{name}={str(path)!r} is a directory. Fix: pass the path of a PNG or JPEG file in it")
    if not path.is_file():
        raise InvalidInputError(f"{name}={str(path)!r} does not exist. Fix: pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidInputError(f"{name}={str(path)!r} cannot be read as an image ({e}). Fix: pass a PNG or JPEG "
                                "file") from None


def image_batch(image, name: str = "image") -> tuple[str, object]:
    """Check an img2img `image` (PIL image(s), NumPy array(s) HWC/NHWC in [0, 1], torch tensor(s) CHW/NCHW in
    [0, 1]) without resizing it: ('pil', [images]), or ('array' / 'torch', float32 NCHW). Typed errors name
    the problem."""
    from sprintrt.errors import invalid

    items = image if isinstance(image, (list, tuple)) else [image]
    if not items or image is None:
        raise invalid(name, image, "a PIL image, an HxWx3 NumPy array in [0, 1], a 3xHxW torch tensor in [0, 1], "
                      "or a list of them", "pass the image to start from")
    if all(type(i).__module__.startswith("PIL") for i in items):
        for k, img in enumerate(items):
            if img.mode != "RGB":
                raise invalid(f"{name}[{k}]" if len(items) > 1 else name, f"a PIL image in mode {img.mode!r}",
                              "3 channels (mode 'RGB')", "convert it first: image.convert('RGB')")
        return "pil", list(items)
    arrays, kinds = [], set()
    for k, img in enumerate(items):
        item = f"{name}[{k}]" if len(items) > 1 else name
        kinds.add("torch" if type(img).__module__.startswith("torch") else "array")
        if type(img).__module__.startswith("torch"):
            arr = img.detach().cpu().float().numpy()
            arr = arr[None] if arr.ndim == 3 else arr  # CHW -> NCHW
        elif isinstance(img, np.ndarray):
            arr = img.astype(np.float32)
            arr = arr[None] if arr.ndim == 3 else arr  # HWC -> NHWC
            if arr.ndim == 4:
                arr = arr.transpose(0, 3, 1, 2)
        else:
            raise invalid(item, img, "a PIL image, a NumPy array or a torch tensor", "pass the image as one of those")
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise invalid(item, f"an array of shape {tuple(np.shape(img))}", "3 channels (HxWx3 for NumPy, 3xHxW "
                          "for torch, optionally with a batch axis first)", "pass an RGB image")
        if not np.isfinite(arr).all():
            raise invalid(item, "an array with NaN or inf", "finite values in [0, 1]", "clean the image first")
        arrays.append(arr)
    if len(kinds) > 1 or len({a.shape[1:] for a in arrays}) > 1:
        raise invalid(name, "a list of mixed kinds or sizes", "images of one kind and one size",
                      "pass one batch array, or a list of PIL images")
    return kinds.pop(), np.concatenate(arrays, axis=0)


def preprocess_image(kind: str, images, height: int, width: int) -> np.ndarray:
    """The VAE encoder's input, float32 NCHW in [-1, 1], exactly as SanaSprintImg2ImgPipeline prepares it:
    PIL images resized with Lanczos by PIL; arrays resized 'nearest' (torch tensors of another size
    bilinear first, as prepare_image does); values in [0, 1] mapped to [-1, 1] (arrays already below 0
    are taken as [-1, 1], with diffusers' deprecation)."""
    from PIL import Image

    if kind == "pil":
        resized = [img.resize((width, height), resample=Image.LANCZOS, reducing_gap=None) for img in images]
        x = np.stack([np.array(img).astype(np.float32) / 255.0 for img in resized]).transpose(0, 3, 1, 2)
    else:
        x = images
        if kind == "torch" and x.shape[2:] != (height, width):
            x = resize_bilinear(x, height, width).astype(np.float32)
        x = resize_nearest(x, height, width)
    if x.min() < 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(np.float32(2.0) * x - np.float32(1.0), dtype=np.float32)


def control_picture(height: int, width: int, seed: int | None = None) -> "object":
    """A scribble (white strokes on black, SANA's ControlNet format): with no seed the fixed one the ControlNet
    benchmark and the tuner run with; with a seed, random strokes (the int8 calibration's control images: a change
    to how they are drawn bumps tuning/calibration.py's CALIBRATION_SAMPLING, part of the int8 engines' keys)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    stroke = max(2, min(height, width) // 64)
    if seed is None:
        draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), outline=(255, 255, 255),
                     width=stroke)
        draw.line((width // 8, 7 * height // 8, 7 * width // 8, height // 8), fill=(255, 255, 255), width=stroke)
        return img
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x0, x1 = rng.integers(0, width, 2)
        y0, y1 = rng.integers(0, height, 2)
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=(255, 255, 255), width=stroke)
    return img


# ---- image output: checked before any work, written atomically ---------------------------------------------

COMMON_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_output(path, name: str = "output"):
    """(path, PIL format) for an image to be written at `path`, checked before anything is generated: an image
    extension PIL can write, and a path files.check_output_file accepts (not a directory, a writable folder)."""
    from pathlib import Path

    from PIL import Image

    from sprintrt.errors import invalid
    from sprintrt.files import check_output_file

    path = check_output_file(path, name)
    Image.init()
    writable = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    fmt = writable.get(path.suffix.lower())
    if fmt is None or not _writes_rgb(fmt):
        raise invalid(name, str(path), f"an image file name: {', '.join(COMMON_IMAGE_SUFFIXES)} or another "
                      "extension PIL writes", f"name it e.g. {Path(path).with_suffix('.png')}")
    return path, fmt


def _writes_rgb(fmt: str) -> bool:
    """Whether PIL can write an RGB picture as `fmt` here (some formats register a writer that needs a plugin
    or another mode): a 1x1 try, so a bad extension fails before the work, not after it."""
    import io

    from PIL import Image

    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


def save_image_file(image, path, fmt: str) -> None:
    """Write a PIL image to `path` through a temporary file renamed over it: a full disk or an interrupt leaves
    the previous file whole. A failure is a typed error naming the file."""
    from pathlib import Path

    from sprintrt.errors import InvalidInputError
    from sprintrt.files import replacing

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            image.save(tmp, format=fmt)
    except OSError as e:  # ENOSPC, EFBIG (a file-size limit), EIO, permissions changed since the check
        raise InvalidInputError(f"cannot write {path}: {e.strerror or e} (the file that was there, if any, is "
                                "unchanged). Fix: free disk space, or pick another output path") from None
