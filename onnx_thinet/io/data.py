"""Calibration data: .npy / .npz arrays or an image folder, checked against the model's inputs.

Arrays are memory-mapped and images decoded per batch, so memory does not grow with the
size of the calibration set.
"""

from __future__ import annotations

import abc
import logging
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.feeds import ONNX_TO_NUMPY
from onnx_thinet.io.graph import graph_inputs

__all__ = [
    "PRESETS",
    "ArrayData",
    "CalibrationData",
    "ImageFolderData",
    "Preprocess",
    "check_arrays",
    "load_calibration",
    "parse_preprocess",
    "read_npy",
    "read_npz",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input (sizes and layout default to the model's)."""

    size: int | None = None  # square crop side
    resize: int | None = None  # shorter side before the centre crop; None: resize to `size`
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0  # applied to 0..255 pixels before mean/std
    bgr: bool = False
    layout: str | None = None  # "NCHW" or "NHWC"


PRESETS = {
    "imagenet": Preprocess(resize=256, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "caffe": Preprocess(resize=256, size=224, mean=(103.939, 116.779, 123.68), scale=1.0, bgr=True),
    "unit": Preprocess(),
}


def parse_preprocess(spec: str) -> Preprocess:
    """`PRESET[,key=value...]`, e.g. `imagenet,size=160,layout=nhwc` or `unit,mean=0.5,std=0.5`."""
    name, *overrides = [p.strip() for p in spec.split(",") if p.strip()]
    if name not in PRESETS:
        raise ThinetError(f"preprocess: unknown preset {name!r} (choose {', '.join(PRESETS)})",
                          params=("preprocess",))
    pre = PRESETS[name]
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            pre = _override(pre, key.strip().lower(), value.strip())
        except ValueError:
            raise ThinetError(f"preprocess: cannot read {item!r}", params=("preprocess",)) from None
    return pre


def _override(pre: Preprocess, key: str, value: str) -> Preprocess:
    floats = tuple(float(v) for v in value.split(":")) if key in ("mean", "std") else None
    if key in ("size", "resize"):
        return replace(pre, **{key: int(value)})
    if key in ("mean", "std"):
        return replace(pre, **{key: floats if len(floats) > 1 else floats * 3})
    if key == "scale":
        return replace(pre, scale=float(value))
    if key == "layout" and value.upper() in ("NCHW", "NHWC"):
        return replace(pre, layout=value.upper())
    if key == "bgr":
        return replace(pre, bgr=value.lower() in ("1", "true", "yes"))
    raise ValueError(key)


class CalibrationData(abc.ABC):
    """A set of samples for the model's inputs, read one batch of indices at a time."""

    names: tuple[str, ...]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArrayData(CalibrationData):
    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ThinetError("calibration arrays have different numbers of samples")
        self.arrays = arrays
        self.names = tuple(arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        order = np.sort(indices)  # sorted reads are cheap on a memory map
        return {k: np.ascontiguousarray(a[order]) for k, a in self.arrays.items()}


class ImageFolderData(CalibrationData):
    def __init__(self, files: list[Path], name: str, dims: tuple, pre: Preprocess):
        self.files, self.names, self.dims, self.pre = files, (name,), dims, pre

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        images = [_read_image(self.files[i], self.dims, self.pre) for i in np.sort(indices)]
        return {self.names[0]: np.stack(images)}


def load_calibration(
    path: str | os.PathLike, model: onnx.ModelProto, preprocess: Preprocess | None = None
) -> CalibrationData:
    """Open CALIB for `model` and check every input's shape and dtype against the graph."""
    path = Path(path)
    if not path.exists():
        raise ThinetError(f"{path}: no such calibration file or folder")
    inputs = graph_inputs(model)
    if path.is_dir():
        return _image_folder(path, inputs, preprocess or PRESETS["unit"])
    if path.suffix == ".npy":
        if len(inputs) != 1:
            raise ThinetError(f"{path}: a .npy feeds one input, the model has {len(inputs)}; use .npz")
        arrays = {inputs[0].name: _load_npy(path)}
    elif path.suffix == ".npz":
        arrays = read_npz(path)
    else:
        raise ThinetError(f"{path}: calibration data must be .npy, .npz or a folder of images")
    return ArrayData(check_arrays(path, arrays, inputs))


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A `.npy` array, memory-mapped (pickles refused), or one line saying why not."""
    return _load_npy(Path(path))


def read_npz(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of a `.npz` archive (pickles refused); `required` names must be among them.

    The one `.npz` reader: calibration, labelled evaluation data and fine-tuning data.
    """
    path = Path(path)
    arrays = _load_npz(path)
    missing = [name for name in required if name not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise ThinetError(f"{path}: no array {missing[0]!r} (found: {found})")
    return arrays


def _load_npy(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            shape, dtype, header = _npy_header(f)
        _check_npy_member(path, path.name, shape, dtype, header, path.stat().st_size)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"{path}: not a readable .npy array ({exc})") from None


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of an .npy stream, reading only its header."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype, f.tell()


def _check_npy_member(path: Path, name: str, shape, dtype: np.dtype, header: int, size: int) -> int:
    """No pickled objects, and the data the header promises is really there; returns its bytes."""
    if dtype.hasobject:
        raise ThinetError(f"{path}: array {name!r} holds Python objects (pickled data); refusing it")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size < header + nbytes:
        raise ThinetError(f"{path}: array {name!r} is truncated or lies about its shape {tuple(shape)} "
                          f"({size - header:,} of {nbytes:,} bytes present)")
    return nbytes


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ThinetError(f"{path}: not a readable .npz archive ({exc})") from None


def _memory_limit() -> int:
    """Half the machine's memory: an .npz is read whole, unlike a memory-mapped .npy."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _check_npz_members(path: Path) -> None:
    """Read each member's .npy header (not its data): no pickled objects, sizes that fit in
    memory and that the archive really holds (huge, zip-bomb or truncated archives)."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                shape, dtype, header = _npy_header(member)
            total += _check_npy_member(path, info.filename, shape, dtype, header, info.file_size)
    if total > _memory_limit():
        raise ThinetError(f"{path}: the arrays need {total / 2**30:.1f} GiB in memory; "
                          "use a .npy per input (memory-mapped) or fewer samples")


def check_arrays(path: Path, arrays: dict[str, np.ndarray], inputs) -> dict[str, np.ndarray]:
    """Arrays keyed by input name, shape- and dtype-checked (floats cast lazily to the model's)."""
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ThinetError(f"{path}: no array for model input(s) {missing} (found {sorted(arrays)})")
    checked = {}
    for inp in inputs:
        array = arrays[inp.name]
        want = ONNX_TO_NUMPY.get(inp.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if array.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], array.shape[1:])):
            shown = ["?" if d is None else d for d in dims]
            raise ThinetError(
                f"{path}: array {inp.name!r} has shape {tuple(array.shape)}, model input expects {shown}"
            )
        if len(array) == 0:
            raise ThinetError(f"{path}: array {inp.name!r} holds no samples")
        if want is not None and array.dtype != want:
            if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(want, np.floating)):
                raise ThinetError(
                    f"{path}: array {inp.name!r} is {array.dtype}, model input expects {np.dtype(want)}"
                )
            array = _CastView(array, want)
        checked[inp.name] = array
    return checked


class _CastView:
    """Casts float data to the model's float type one batch at a time (keeps the memory map)."""

    def __init__(self, array: np.ndarray, dtype):
        self.array, self.dtype = array, np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return np.asarray(self.array[index], dtype=self.dtype)


def _image_folder(path: Path, inputs, pre: Preprocess) -> ImageFolderData:
    if len(inputs) != 1:
        raise ThinetError(f"{path}: an image folder feeds one input, the model has {len(inputs)}")
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise ThinetError(f"{path}: no image files (.jpg, .png, ...) in the folder")
    files = [f for f in found if _decodes(f)]
    if not files:
        shown = ", ".join(f.name for f in found[:3]) + (" ..." if len(found) > 3 else "")
        raise ThinetError(f"{path}: none of the {len(found)} image files can be decoded ({shown})")
    if len(files) < len(found):
        logger.warning("%s: skipped %d of %d image files that cannot be decoded",
                       path, len(found) - len(files), len(found))
    inp = inputs[0]
    if inp.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise ThinetError(f"{path}: model input {inp.name!r} is not float; feed a .npy instead")
    dims = _image_dims(inp, pre)
    data = ImageFolderData(files, inp.name, dims, pre)
    try:
        data.batch(np.arange(1))
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"{path}: cannot use images ({exc})") from None
    return data


def _decodes(file: Path) -> bool:
    """Whether PIL decodes the whole file (JPEGs at a reduced draft size: cheap)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            img.draft("RGB", (64, 64))
            img.load()
        return True
    except Exception:  # PIL raises many types for corrupt files (OSError, SyntaxError, ...)
        return False


def _image_dims(inp: onnx.ValueInfoProto, pre: Preprocess) -> tuple[int, int, int | None, int]:
    """(channels, crop size, resize, layout code) from the model's input and the preprocessing.

    A static input size wins over the preset's; the preset's resize keeps its ratio to it.
    """
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ThinetError(f"model input {inp.name!r} is not 4-D; an image folder cannot feed it")
    layout = pre.layout or ("NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW")
    channels = dims[1] if layout == "NCHW" else dims[3]
    side = dims[2] if layout == "NCHW" else dims[1]
    size = side or pre.size or 224
    resize = None
    if pre.resize:
        resize = round(pre.resize * size / pre.size) if pre.size else pre.resize
    return (channels or 3, size, resize, 0 if layout == "NCHW" else 1)


def _read_image(file: Path, dims: tuple, pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    channels, size, resize, layout = dims
    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = _resize_crop(img, size, resize)
            pixels = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise ThinetError(f"{file}: unreadable image ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.bgr:
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(pre.mean[:channels], dtype=np.float32)
    std = np.asarray(pre.std[:channels], dtype=np.float32)
    pixels = (pixels * pre.scale - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if layout == 0 else pixels)


def _resize_crop(img, size: int, resize: int | None):
    from PIL import Image

    if resize is None:
        return img.resize((size, size), Image.Resampling.BILINEAR)
    w, h = img.size
    ratio = resize / min(w, h)
    img = img.resize((max(size, round(w * ratio)), max(size, round(h * ratio))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
