"""Image processor of the CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017).

Pillow/NumPy only (transformers' `PilBackend`; no torchvision). This file imports from transformers, numpy and PIL
only, and from no other capsnet_hf module: it is copied alone into saved folders for `trust_remote_code` loading.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, load_image
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_tensor

RESIZE_MODES = ("resize", "crop_or_pad")
SUPPORTED_NUM_CHANNELS = (1, 3)
# ITU-R 601-2 luma weights, the ones of PIL's "L" conversion.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# PIL modes read as they are (8-bit, 16-bit, 32-bit integer and float); the others listed are converted first.
_DIRECT_MODES = ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_CONVERTED_MODES = {
    "P": "RGBA",
    "PA": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "La": "LA",
    "RGBa": "RGBA",
}
# Full-scale value of the pixel data: it maps to 255 on the working "pixel scale".
_FULL_SCALE_8BIT = 255.0
_FULL_SCALE_16BIT = 65535.0
_FULL_SCALE_FLOAT = 1.0


class CapsNetImageProcessorKwargs(ImagesKwargs, total=False):
    """
    num_channels (`int`, *optional*, defaults to `self.num_channels`):
        Channels of the output: 1 (ITU-R 601-2 luma) or 3 (RGB).
    resize_mode (`str`, *optional*, defaults to `self.resize_mode`):
        `"resize"` (resample to `size` with `resample`) or `"crop_or_pad"` (centre-crop or zero-pad each dimension
        to `size`, as TensorFlow's `resize_image_with_crop_or_pad`).
    do_standardize (`bool`, *optional*, defaults to `self.do_standardize`):
        Per-image standardization computed on the 0..255 pixel scale, as TensorFlow's `per_image_standardization`
        (replaces rescaling).
    do_invert (`bool`, *optional*, defaults to `self.do_invert`):
        Invert intensities (x -> 1 - x on the 0..1 scale) before resizing/padding and standardization, for
        dark-on-light drawings.
    """

    num_channels: int
    resize_mode: str
    do_standardize: bool
    do_invert: bool


class CapsNetImageProcessor(PilBackend):
    r"""
    Turns PIL images, NumPy arrays or torch tensors (one image or a batch) into CapsNet `pixel_values`
    `[batch, num_channels, height, width]` float32.

    Steps, per image, in this order:

    1. **Read** onto the working *pixel scale* 0..255 (float64). The scale of the input is set by its data type:
       8-bit data (PIL modes L/RGB/RGBA/P/..., 32-bit integer mode I, uint8 and other integer arrays) is on 0..255;
       16-bit data (PIL modes I;16*, uint16 arrays) on 0..65535; floating-point data (float arrays/tensors, PIL mode F) on 0..1;
       booleans (PIL mode 1) on {0, 1}. Values outside that range, NaN and infinities raise `ValueError`. So float
       input already in [0, 1] is never rescaled twice: a uint8 image and the same image divided by 255 give the
       same output (up to float rounding). Arrays are `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1..4 (gray,
       gray+alpha, RGB, RGBA); the layout is inferred from which end has a size in 1..4 and, when both ends do
       (e.g. `(3, 4, 4)`), must be given as `input_data_format`. A 4-D array/tensor is a batch; so is a (nested)
       list; a string is a local file (opened keeping its mode, e.g. 16-bit) or a URL.
    2. **Convert** to `num_channels`: alpha is composited on black (colour x alpha), then 3 -> 1 channel by the
       ITU-R 601-2 luma weights of PIL's "L" conversion (computed in floating point, so a PIL image and its
       `np.asarray` give identical outputs) and 1 -> 3 by replication.
    3. **Invert** (`do_invert`): x -> 255 - x, i.e. 1 - x on the 0..1 scale, before any padding so that padding
       stays black (background) for dark-on-light drawings.
    4. **Resize** (`do_resize`) to `size`: `resize_mode="resize"` resamples each channel in 32-bit float with PIL
       (`resample`, bilinear by default; results clipped to 0..255), `"crop_or_pad"` centre-crops or zero-pads each
       dimension as TensorFlow's `resize_image_with_crop_or_pad` (32 -> 24 keeps rows/columns 4..27). Then the
       standard `do_center_crop` (to `crop_size`, same crop-or-pad rule) and `do_pad` (bottom/right, to `pad_size`).
    5. **Scale**: with `do_standardize`, per-image standardization `(x - mean) / max(std, 1 / sqrt(N))` over all
       N = C x H x W values of the image on the 0..255 scale (TensorFlow's `per_image_standardization`, the official
       CIFAR-10 preprocessing); rescaling is then not applied (the floor makes the two differ on nearly flat
       images). Otherwise `do_rescale` multiplies by `rescale_factor` (1/255: 0..1 output; without it the output
       stays on 0..255), then `do_normalize` applies `(x - image_mean) / image_std` as usual.

    Presets: the official MNIST models take the defaults (28x28x1, rescaled to [0, 1]); the official CIFAR-10
    models take `CapsNetImageProcessor(size=24, num_channels=3, resize_mode="crop_or_pad", do_rescale=False,
    do_standardize=True)` on 32x32 images. [`~CapsNetImageProcessor.from_model_config`] reads `size` and
    `num_channels` from a `CapsNetConfig`.

    Args:
        size (`dict[str, int]` or `int`, defaults to `{"height": 28, "width": 28}`): output size.
        num_channels (`int`, defaults to 1): output channels, 1 or 3.
        resize_mode (`str`, defaults to `"resize"`): `"resize"` or `"crop_or_pad"`.
        resample (`PILImageResampling`, defaults to `BILINEAR`): filter of `resize_mode="resize"`.
        do_resize (`bool`, defaults to `True`): bring every image to `size` (by `resize_mode`).
        do_rescale (`bool`, defaults to `True`), rescale_factor (`float`, defaults to 1/255): rescaling.
        do_standardize (`bool`, defaults to `False`): per-image standardization (see above).
        do_invert (`bool`, defaults to `False`): intensity inversion (see above).
        do_normalize (`bool`, defaults to `False`), image_mean, image_std: usual mean/std normalization after
            rescaling (not combinable with `do_standardize`).
        data_format (`ChannelDimension`, defaults to channels first): layout of the output.
    """

    valid_kwargs = CapsNetImageProcessorKwargs
    model_input_names = ["pixel_values"]

    size = {"height": 28, "width": 28}
    num_channels = 1
    resize_mode = "resize"
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_standardize = False
    do_invert = False
    do_normalize = False

    def __init__(self, **kwargs: Unpack[CapsNetImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name, None) for name in self._valid_kwargs_names})

    @classmethod
    def from_model_config(cls, config: Any, **kwargs: Unpack[CapsNetImageProcessorKwargs]) -> CapsNetImageProcessor:
        """
        Processor matching a model configuration: `size` and `num_channels` are read from the config's `image_size`
        (int or `[height, width]`) and `num_channels` attributes (duck-typed: any object with them works);
        `kwargs` set everything else, or override those two.
        """
        image_size = getattr(config, "image_size", None)
        num_channels = getattr(config, "num_channels", None)
        if image_size is None or num_channels is None:
            raise ValueError(f"config must have `image_size` and `num_channels` attributes, got {type(config)}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        kwargs.setdefault("size", {"height": int(height), "width": int(width)})
        kwargs.setdefault("num_channels", int(num_channels))
        return cls(**kwargs)

    def _validate_preprocess_kwargs(
        self,
        size: SizeDict | None = None,
        num_channels: int | None = None,
        resize_mode: str | None = None,
        do_standardize: bool | None = None,
        do_normalize: bool | None = None,
        do_convert_rgb: bool | None = None,
        do_center_crop: bool | None = None,
        crop_size: SizeDict | None = None,
        rescale_factor: float | None = None,
        **kwargs,
    ) -> None:
        """Check the options (the standard ones by transformers, then CapsNet's); raises `ValueError`."""
        super()._validate_preprocess_kwargs(
            size=size,
            do_normalize=do_normalize,
            do_center_crop=do_center_crop,
            crop_size=crop_size,
            rescale_factor=rescale_factor,
            **kwargs,
        )
        for name, value in (("size", size), ("crop_size", crop_size if do_center_crop else None)):
            if value is not None and not (value.height and value.width and value.height > 0 and value.width > 0):
                raise ValueError(f"{name} must have positive 'height' and 'width', got {dict(value)}")
        if num_channels not in SUPPORTED_NUM_CHANNELS:
            raise ValueError(f"num_channels must be one of {SUPPORTED_NUM_CHANNELS}, got {num_channels!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if do_standardize and do_normalize:
            raise ValueError("do_standardize and do_normalize are exclusive: choose one")
        if do_convert_rgb and num_channels != 3:
            raise ValueError(f"do_convert_rgb=True asks for RGB output but num_channels is {num_channels}")
        if kwargs.get("do_rescale") and not do_standardize and not (rescale_factor and rescale_factor > 0):
            raise ValueError(f"rescale_factor must be positive, got {rescale_factor!r}")

    # ----------------------------------------------------------------------------------------------------------------
    # Input preparation: flat list of images, each read onto the pixel scale and converted to num_channels.
    # ----------------------------------------------------------------------------------------------------------------

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        """Flatten one image, a 4-D batch or (nested) lists of them into a list of single images."""
        flat = _flatten_images(images)
        if not flat:
            raise ValueError("no images were given (empty list or batch)")
        return flat

    def _prepare_image_like_inputs(self, images: Any, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        """`process_image` on every image; a `ValueError` names the image's index in the batch."""
        prepared = []
        for index, image in enumerate(self._prepare_images_structure(images)):
            try:
                prepared.append(self.process_image(image, *args, **kwargs))
            except ValueError as error:
                raise ValueError(f"image {index} of the batch: {error}") from error
        return prepared

    def process_image(
        self,
        image: Any,
        num_channels: int | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        One PIL image, array or tensor -> float64 `(num_channels, H, W)` on the 0..255 pixel scale (steps 1-2 of
        the class docstring).
        """
        num_channels = self.num_channels if num_channels is None else num_channels
        if isinstance(image, Image.Image):
            pixels = _read_pil_image(image)
        else:
            pixels = _read_array(_as_numpy(image), input_data_format)
        return _convert_channels(pixels, num_channels)

    # ----------------------------------------------------------------------------------------------------------------
    # Geometry.
    # ----------------------------------------------------------------------------------------------------------------

    def resize(
        self, image: np.ndarray, size: SizeDict, resample: PILImageResampling | int | None = None, **kwargs
    ) -> np.ndarray:
        """
        Resample `(C, H, W)` float on the 0..255 scale to `(C, size.height, size.width)`, channel by channel in PIL
        mode "F" (no 8-bit rounding); results are clipped to 0..255 (overshoot of bicubic/Lanczos filters).
        """
        resample = PILImageResampling.BILINEAR if resample is None else PILImageResampling(resample)
        height, width = size.height, size.width
        if image.shape[-2:] == (height, width):
            return image
        planes = [
            np.asarray(Image.fromarray(plane.astype(np.float32)).resize((width, height), resample=resample))
            for plane in image
        ]
        return np.clip(np.stack(planes).astype(np.float64), 0.0, 255.0)

    def crop_or_pad(self, image: np.ndarray, size: SizeDict) -> np.ndarray:
        """Centre-crop or zero-pad `(C, H, W)` to `(C, size.height, size.width)` ([`crop_or_pad`])."""
        return crop_or_pad(image, size.height, size.width, axes=(1, 2))

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Standard `do_center_crop`: the same centre crop-or-pad as `resize_mode="crop_or_pad"`."""
        return self.crop_or_pad(image, size)

    # ----------------------------------------------------------------------------------------------------------------
    # Batch processing.
    # ----------------------------------------------------------------------------------------------------------------

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...] | None,
        image_std: float | tuple[float, ...] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors: str | TensorType | None,
        resize_mode: str = "resize",
        do_invert: bool = False,
        do_standardize: bool = False,
        data_format: str | ChannelDimension | None = ChannelDimension.FIRST,
        **kwargs,
    ) -> BatchFeature:
        """Steps 3-5 of the class docstring on images from `process_image`; returns `pixel_values` [B, C, H, W]."""
        processed = []
        for image in images:
            if do_invert:
                image = 255.0 - image
            if do_resize and resize_mode == "resize":
                image = self.resize(image, size, resample)
            elif do_resize:
                image = self.crop_or_pad(image, size)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            processed.append(image)
        if do_pad:
            processed = self.pad(processed, pad_size=pad_size)
        shapes = sorted({image.shape[-2:] for image in processed})
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {shapes} and cannot be batched: set do_resize=True")
        batch = np.stack(processed)

        if do_standardize:
            batch = standardize_per_image(batch)
        else:
            if do_rescale:
                batch = batch * rescale_factor
            if do_normalize:
                mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float64), (batch.shape[1],))
                std = np.broadcast_to(np.asarray(image_std, dtype=np.float64), (batch.shape[1],))
                batch = (batch - mean[:, None, None]) / std[:, None, None]
        if data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST:
            batch = batch.transpose(0, 2, 3, 1)
        return BatchFeature(data={"pixel_values": batch.astype(np.float32)}, tensor_type=return_tensors)


def crop_or_pad(pixels: np.ndarray, height: int, width: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """
    Centre-crop or zero-pad the two `axes` of `pixels` to `height` and `width`, each independently, as TensorFlow's
    `resize_image_with_crop_or_pad`: a crop starts at `(H - height) // 2`; a pad puts `(height - H) // 2` rows before
    and the rest after (same for columns).
    """
    for axis, target in zip(axes, (height, width), strict=True):
        current = pixels.shape[axis]
        if current > target:
            start = (current - target) // 2
            pixels = np.take(pixels, np.arange(start, start + target), axis=axis)
        elif current < target:
            before = (target - current) // 2
            pad_width = [(0, 0)] * pixels.ndim
            pad_width[axis] = (before, target - current - before)
            pixels = np.pad(pixels, pad_width, mode="constant", constant_values=0)
    return pixels


def standardize_per_image(batch: np.ndarray) -> np.ndarray:
    """
    TensorFlow's `per_image_standardization` of every image of `batch` [B, C, H, W] (on the 0..255 scale):
    `(x - mean) / max(std, 1 / sqrt(N))`, mean and (population) std over the N = C x H x W values of each image.
    """
    flat = batch.reshape(batch.shape[0], -1).astype(np.float64)
    mean = flat.mean(axis=1, keepdims=True)
    std = np.maximum(flat.std(axis=1, keepdims=True), 1.0 / math.sqrt(flat.shape[1]))
    return ((flat - mean) / std).reshape(batch.shape)


def _flatten_images(images: Any) -> list[Any]:
    """A single image, a 4-D batch, a path/URL or (nested) lists/tuples of them -> flat list of single images."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, str):
        return [_load_image(images)]
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray) or is_torch_tensor(images):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(
            f"wrong rank: expected an (H, W), (H, W, C) or (C, H, W) image or a 4-D batch, got shape "
            f"{tuple(images.shape)}"
        )
    raise TypeError(f"expected PIL images, NumPy arrays, torch tensors or paths/URLs, got {type(images).__name__}")


def _check_pixel_count(width: int, height: int, what: str) -> None:
    """Refuse an image larger than PIL's decompression-bomb limit before its pixels are decoded or copied."""
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} is {width}x{height} pixels, more than PIL's limit of {Image.MAX_IMAGE_PIXELS} "
            "(PIL.Image.MAX_IMAGE_PIXELS): downsize it first"
        )


def _load_image(source: str) -> Image.Image:
    """A local file keeps its mode (e.g. 16-bit I;16); URLs and base64 strings go through transformers' loader."""
    if not os.path.isfile(source):
        return load_image(source)
    try:
        with Image.open(source) as image:
            _check_pixel_count(image.width, image.height, f"image file {source!r}")
            image.load()
            return image
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's errors for a corrupt file
        raise ValueError(f"cannot decode image file {source!r}: {error}") from error


def _as_numpy(image: Any) -> np.ndarray:
    """Torch tensor (any device, any float dtype) or array-like -> NumPy array."""
    if is_torch_tensor(image):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.double()
        return image.numpy()
    return np.asarray(image)


def _read_pil_image(image: Image.Image) -> np.ndarray:
    """PIL image -> float64 `(S, H, W)` on the 0..255 scale, S in 1..4 (gray, gray+alpha, RGB, RGBA)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"zero-size image ({image.width}x{image.height})")
    _check_pixel_count(image.width, image.height, "the image")
    if image.mode in _CONVERTED_MODES:
        image = image.convert(_CONVERTED_MODES[image.mode])
    elif image.mode not in _DIRECT_MODES:
        supported = sorted(_DIRECT_MODES + tuple(_CONVERTED_MODES))
        raise ValueError(f"unsupported PIL image mode {image.mode!r}; supported modes: {', '.join(supported)}")
    values = np.asarray(image)
    # I;16* are 16-bit files; "I" is 32-bit integer data, read like the int32 array it is.
    full_scale = _FULL_SCALE_16BIT if image.mode.startswith("I;16") else _full_scale_of(values.dtype)
    values = _to_pixel_scale(values, full_scale, f"PIL mode {image.mode!r}")
    return values[None] if values.ndim == 2 else np.moveaxis(values, -1, 0)


def _read_array(values: np.ndarray, input_data_format: str | ChannelDimension | None) -> np.ndarray:
    """Array `(H, W)`, `(H, W, C)` or `(C, H, W)` -> float64 `(C, H, W)` on the 0..255 scale."""
    if values.ndim not in (2, 3):
        raise ValueError(f"wrong rank: expected an (H, W), (H, W, C) or (C, H, W) image, got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"empty array of shape {values.shape}")
    values = _to_pixel_scale(values, _full_scale_of(values.dtype), f"{values.dtype} array")
    if values.ndim == 2:
        return values[None]
    channel_sizes = (1, 2, 3, 4)
    if input_data_format is not None:
        channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
    elif (values.shape[0] in channel_sizes) == (values.shape[-1] in channel_sizes):
        problem = "ambiguous" if values.shape[0] in channel_sizes else "unknown"
        raise ValueError(
            f"{problem} channel axis in shape {values.shape}: a (C, H, W) or (H, W, C) image needs C in 1..4 at "
            "exactly one end; pass input_data_format='channels_first' or 'channels_last'"
        )
    else:
        channels_first = values.shape[0] in channel_sizes
    values = values if channels_first else np.moveaxis(values, -1, 0)
    if values.shape[0] not in channel_sizes:
        raise ValueError(f"images must have 1 to 4 channels, got {values.shape[0]} (shape {values.shape})")
    return values


def _full_scale_of(dtype: np.dtype) -> float:
    """Value of full intensity for data of this type: 1 (float, bool), 65535 (uint16) or 255 (other integers)."""
    if dtype == np.bool_ or np.issubdtype(dtype, np.floating):
        return _FULL_SCALE_FLOAT
    if dtype == np.uint16:
        return _FULL_SCALE_16BIT
    if np.issubdtype(dtype, np.integer):
        return _FULL_SCALE_8BIT
    raise ValueError(f"unsupported pixel data type {dtype}")


def _to_pixel_scale(values: np.ndarray, full_scale: float, what: str) -> np.ndarray:
    """Check `values` are finite and within [0, full_scale], then map them linearly onto 0..255 (float64)."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    low, high = values.min(), values.max()
    if low < 0 or high > full_scale:
        hint = " (float data is taken to be on the 0..1 scale: divide by 255)" if full_scale == 1 else ""
        raise ValueError(f"{what} values must lie in [0, {full_scale:g}], got [{low:g}, {high:g}]{hint}")
    return values if full_scale == _FULL_SCALE_8BIT else values * (255.0 / full_scale)


def _convert_channels(pixels: np.ndarray, num_channels: int) -> np.ndarray:
    """
    `(S, H, W)` with S in 1..4 -> `(num_channels, H, W)`: alpha (S = 2 or 4) composited on black, then RGB -> gray
    by ITU-R 601-2 luma or gray -> RGB by replication.
    """
    if pixels.shape[0] in (2, 4):
        pixels = pixels[:-1] * (pixels[-1:] / 255.0)
    if pixels.shape[0] == num_channels:
        return pixels
    if num_channels == 1:
        return np.tensordot(LUMA_WEIGHTS, pixels, axes=1)[None]
    return np.repeat(pixels, num_channels, axis=0)


__all__ = ["CapsNetImageProcessor"]
