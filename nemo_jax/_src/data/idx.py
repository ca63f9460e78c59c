"""Reader and writer for the IDX format used by MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, one dtype byte, one byte giving the number of
dimensions `ndim`, then `ndim` big-endian uint32 sizes, then the array in C order
(big-endian for multi-byte types). The files are often gzip-compressed; the
reader detects gzip by its magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

# IDX dtype byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the (decompressed when gzip) content of `path`."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError) as error:
      raise ValueError(f"IDX file {path}: corrupt gzip stream ({error})") from error
  return raw


def parse_idx(content: bytes, source: str = "<bytes>",
              expected_ndim: Optional[int] = None) -> np.ndarray:
  """Parses the bytes of an (uncompressed) IDX file.

  Args:
    content: the file bytes.
    source: a name for error messages (usually the path).
    expected_ndim: if given, the number of dimensions the file must have
      (3 for image files, 1 for label files).

  Returns:
    The array, converted to native byte order.

  Raises:
    ValueError: bad magic number, unknown dtype, wrong number of dimensions or a
      payload whose length does not match the header.
  """
  if len(content) < 4:
    raise ValueError(f"IDX file {source}: {len(content)} bytes, too short for the 4-byte magic number")
  if content[0] != 0 or content[1] != 0:
    raise ValueError(
        f"IDX file {source}: magic number starts with bytes {content[0]:#04x} {content[1]:#04x}, "
        "expected 0x00 0x00 (is this an IDX file?)")
  dtype_code, ndim = content[2], content[3]
  if dtype_code not in IDX_DTYPES:
    raise ValueError(f"IDX file {source}: dtype byte {dtype_code:#04x} is not one of "
                     f"{sorted(hex(c) for c in IDX_DTYPES)}")
  if expected_ndim is not None and ndim != expected_ndim:
    raise ValueError(f"IDX file {source}: ndim={ndim} (magic {content[:4].hex()}), "
                     f"expected ndim={expected_ndim}")
  if ndim == 0:
    raise ValueError(f"IDX file {source}: ndim=0, expected at least 1 dimension")
  header_len = 4 + 4 * ndim
  if len(content) < header_len:
    raise ValueError(f"IDX file {source}: {len(content)} bytes, too short for a header of "
                     f"{header_len} bytes")
  shape = tuple(int(d) for d in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
  dtype = IDX_DTYPES[dtype_code]
  expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  payload = len(content) - header_len
  if payload != expected_bytes:
    raise ValueError(f"IDX file {source}: header shape {shape} of {dtype} needs {expected_bytes} "
                     f"data bytes, file has {payload}")
  array = np.frombuffer(content, dtype=dtype, offset=header_len).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or raw.

  Args:
    path: file path.
    expected_ndim: if given, the required number of dimensions.

  Returns:
    The array in native byte order.

  Raises:
    ValueError: see `parse_idx`; also when the file does not exist.
  """
  if not os.path.isfile(path):
    raise ValueError(f"IDX file {path} does not exist")
  return parse_idx(_read_bytes(path), source=str(path), expected_ndim=expected_ndim)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: Optional[bool] = None) -> None:
  """Writes `array` as an IDX file (used by tests and tools).

  Args:
    path: destination; gzip-compressed when `compress` is True, or when it is
      None and the path ends with ".gz".
    array: array of one of the IDX dtypes (uint8, int8, int16, int32, float32,
      float64).
    compress: force gzip on/off.
  """
  array = np.asarray(array)
  codes = {np.dtype(d).newbyteorder("="): c for c, d in IDX_DTYPES.items()}
  native = array.dtype.newbyteorder("=")
  if native not in codes:
    raise ValueError(f"array dtype {array.dtype} is not one of the IDX dtypes "
                     f"{sorted(str(d) for d in codes)}")
  if array.ndim == 0 or array.ndim > 255:
    raise ValueError(f"array ndim={array.ndim}, IDX needs 1..255 dimensions")
  code = codes[native]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
  body = np.ascontiguousarray(array.astype(IDX_DTYPES[code])).tobytes()
  content = header + body
  if compress is None:
    compress = str(path).endswith(".gz")
  if compress:
    # mtime=0 keeps the bytes reproducible.
    content = gzip.compress(content, mtime=0)
  with open(path, "wb") as f:
    f.write(content)


def read_idx_pair(images_path: str | os.PathLike,
                  labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads an MNIST-style images/labels pair of IDX files.

  Args:
    images_path: IDX file of uint8 images, shape [N, H, W].
    labels_path: IDX file of uint8 labels, shape [N].

  Returns:
    (images uint8 [N, H, W, 1], labels int32 [N]).

  Raises:
    ValueError: wrong dtype or ndim, or the two files disagree on N.
  """
  images = read_idx(images_path, expected_ndim=3)
  labels = read_idx(labels_path, expected_ndim=1)
  if images.dtype != np.uint8:
    raise ValueError(f"IDX file {images_path}: dtype {images.dtype}, expected uint8 images")
  if labels.dtype != np.uint8:
    raise ValueError(f"IDX file {labels_path}: dtype {labels.dtype}, expected uint8 labels")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"IDX files disagree on the number of examples: {images_path} has "
                     f"{images.shape[0]} images, {labels_path} has {labels.shape[0]} labels")
  return images[..., None], labels.astype(np.int32)
