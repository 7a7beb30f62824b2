"""JPEG headers read from a file's bytes without decoding: size, coding, colour and orientation.

The GPU decoder (nvJPEG, through torchvision) takes sequential 8-bit colour
JPEGs, the bulk of photo datasets. The rest decode on the CPU, as image viewers
show them (images.read_image): progressive and lossless files, CMYK/YCCK and
greyscale, 12-bit, and files with an EXIF orientation, which nvJPEG ignores.
The header also gives the size an image decodes to, so annotations are checked
against it before any decoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
EOI_SEARCH = 32  # encoders may pad a few bytes after EOI
# Start-of-frame markers (all but DHT 0xC4, JPG 0xC8 and DAC 0xCC in C0..CF).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential Huffman: what nvJPEG decodes
APP1, APP14, SOS = 0xE1, 0xEE, 0xDA
STANDALONE = frozenset(range(0xD0, 0xD9)) | {0x01}  # RSTn, SOI, TEM: no length field
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    height: int
    width: int
    components: int  # 3: YCbCr (or RGB), 1: greyscale, 4: CMYK/YCCK
    frame: int  # the start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    precision: int  # bits per sample
    adobe_transform: int | None  # APP14 "Adobe" colour transform, when present
    orientation: int  # EXIF orientation, 1 (upright) when absent


def read_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The header of a JPEG file's bytes; None when they are not a JPEG with a frame header."""
    if bytes(data[:2]) != SOI:
        return None
    pos, orientation, adobe = 2, 1, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # not at a marker: damaged; the CPU decoder names the problem
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if marker in SOF_MARKERS and len(body) >= 6:
            precision, height, width, components = struct.unpack(">BHHB", body[:6])
            return JpegHeader(height, width, components, marker, precision, adobe, orientation)
        if marker == APP1 and bytes(body[:6]) == b"Exif\x00\x00":
            orientation = exif_orientation(bytes(body[6:]))
        elif marker == APP14 and bytes(body[:5]) == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        elif marker == SOS:
            return None  # scan data before any frame header
        pos += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in an EXIF (TIFF-structured) block; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == EXIF_ORIENTATION and kind == 3:  # SHORT, stored in the value field itself
            (value,) = struct.unpack(order + "H", entry[8:10])
            return value if 1 <= value <= 8 else 1
    return 1


def gpu_decodable(header: JpegHeader | None) -> bool:
    """Whether nvJPEG decodes this file to the RGB pixels the CPU path gives."""
    return (
        header is not None
        and header.frame in SEQUENTIAL
        and header.precision == 8
        and header.components == 3
        # Adobe transform 0 marks RGB stored without YCbCr conversion; 1 is YCbCr.
        and header.adobe_transform in (None, 1)
        and header.orientation == 1
        and header.height > 0  # 0: height given later in a DNL marker
        and header.width > 0
    )


def for_gpu(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The header of a JPEG file that the GPU decodes (gpu_decodable) and that ends with its EOI
    marker; None for every file to decode on the CPU. A cut-off file goes to the CPU decoder,
    which reports it, instead of nvJPEG, which may fill the missing part in."""
    header = read_header(data)
    if not gpu_decodable(header) or EOI not in bytes(data[-EOI_SEARCH:]):
        return None
    return header
