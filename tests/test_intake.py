"""Untrusted images: what storage.intake decodes, and what bot.image_intake downloads.

The downloads run against the fake Discord's attachment server (its origin allowed, as
the tests point ``IMAGINE_IMAGE_ORIGINS`` at it).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from bot.image_intake import download
from storage.intake import (
    STORED_MAX_SIDE,
    ImageRefused,
    IntakeLimits,
    decode_image,
    fit_image,
    intake_image,
    open_stored,
)
from storage.recipe import ImageRef
from storage.settings import Settings, parse_origins, url_origin
from tests.fake_discord import FakeDiscord

LIMITS = IntakeLimits(max_bytes=2 * 2**20, max_pixels=40_000_000)


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height``, with one tiny IDAT: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


SMALL_PNG = encoded(Image.new("RGB", (64, 48), (200, 30, 30)))

UNREADABLE = {
    "text": b"hello, this is not an image at all\n" * 20,
    "svg renamed .png": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
    b'width="100" height="100"><rect width="100" height="100" fill="red"/></svg>',
    "html renamed .png": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "truncated png": SMALL_PNG[: len(SMALL_PNG) // 2],
    "truncated jpeg": encoded(
        Image.effect_noise((128, 128), 50).convert("RGB"), "JPEG", quality=90
    )[:1500],
    "empty": b"",
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_what_is_not_a_whole_image_is_refused_with_a_sentence(name: str) -> None:
    with pytest.raises(ImageRefused, match="could not be read: it is not a PNG, JPEG, WebP or GIF"):
        intake_image(UNREADABLE[name], LIMITS)


def test_too_many_pixels_are_refused_from_the_header_before_decoding() -> None:
    with pytest.raises(ImageRefused, match=r"20000×10000 \(200.0 megapixels\)|far too many"):
        decode_image(png_header_only(20_000, 10_000), LIMITS)
    # Under Pillow's own bomb limit but over ours: the sentence names the size.
    with pytest.raises(ImageRefused, match=r"is 8000×6000 \(48.0 megapixels\); .* up to 40 mega"):
        decode_image(png_header_only(8_000, 6_000), LIMITS)


def test_a_file_over_the_byte_cap_is_refused() -> None:
    small = IntakeLimits(max_bytes=1000, max_pixels=LIMITS.max_pixels)
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert len(data) > 1000
    with pytest.raises(ImageRefused, match="Send a smaller file"):
        intake_image(data, small)


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(io.BytesIO(gif)) as check:
        assert check.n_frames == 2
    image = decode_image(gif, LIMITS)
    assert image.mode == "RGB" and image.getpixel((16, 16)) == (255, 0, 0)


def test_the_exif_orientation_is_applied_and_no_exif_is_kept() -> None:
    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the left half is on top
    exif[0x010F] = "PhoneMaker"
    jpeg = encoded(photo, "JPEG", quality=95, exif=exif)
    kept = intake_image(jpeg, LIMITS)
    assert (kept.width, kept.height) == (20, 40)
    with Image.open(io.BytesIO(kept.png)) as stored:
        assert stored.format == "PNG" and not stored.getexif()
        top = stored.convert("RGB").getpixel((10, 5))
        bottom = stored.convert("RGB").getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # type: ignore[index]
    assert bottom[2] > 200 and bottom[0] < 60  # type: ignore[index]


def test_transparency_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))
    image = decode_image(encoded(rgba), LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (255, 255, 255) and image.getpixel((15, 5)) == (0, 0, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30, 200, 0, 0])
    palette.paste(1, (4, 0, 8, 8))
    gif = encoded(palette, "GIF", transparency=0)
    flat = decode_image(gif, LIMITS)
    assert flat.getpixel((1, 1)) == (255, 255, 255) and flat.getpixel((6, 1)) == (200, 0, 0)


def test_a_big_image_is_kept_at_most_the_stored_side_and_reads_back_exactly() -> None:
    big = Image.linear_gradient("L").resize((3000, 1000)).convert("RGB")
    kept = intake_image(encoded(big, "JPEG", quality=80), LIMITS)
    assert (kept.width, kept.height) == (STORED_MAX_SIDE, round(1000 * STORED_MAX_SIDE / 3000))
    ref = ImageRef(blob_key=kept.sha256, sha256=kept.sha256, width=kept.width, height=kept.height)
    again = open_stored(kept.png, ref)
    assert again.tobytes() == Image.open(io.BytesIO(kept.png)).convert("RGB").tobytes()
    with pytest.raises(Exception, match="does not match its recipe's hash"):
        open_stored(kept.png + b"\0", ref)
    assert fit_image(again, 96, 96).size == (96, 96)


def test_origins_are_normalised_and_tricks_are_not_origins() -> None:
    assert url_origin("https://CDN.discordapp.com:443/a/b.png?x=1") == "https://cdn.discordapp.com"
    assert url_origin("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert url_origin("https://cdn.discordapp.com@evil.example/x.png") is None
    assert url_origin("file:///etc/passwd") is None
    assert url_origin("https://[::1") is None
    assert Settings().allowed_image_origins == (
        "https://cdn.discordapp.com",
        "https://media.discordapp.net",
    )
    assert parse_origins(" https://a.example/ , http://b.example:81") == [
        "https://a.example",
        "http://b.example:81",
    ]
    with pytest.raises(ValueError, match="is not an origin"):
        parse_origins("https://a.example/path")


@pytest.fixture
async def cdn() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_downloads_only_from_allowed_origins_within_the_cap(cdn: FakeDiscord) -> None:
    origins = (cdn.base,)
    url = cdn.upload("ok.png", SMALL_PNG)
    assert await download(url, LIMITS, origins) == SMALL_PNG

    with pytest.raises(ImageRefused, match="only fetches images from Discord"):
        await download("https://example.com/cat.png", LIMITS, origins)
    with pytest.raises(ImageRefused, match="only fetches images from Discord"):
        await download(url.replace("http://", "https://"), LIMITS, origins)  # https only
    downloads = len(cdn.downloads)

    with pytest.raises(ImageRefused, match="Send a smaller file"):  # declared: never fetched
        await download(url, LIMITS, origins, declared_size=LIMITS.max_bytes + 1)
    assert len(cdn.downloads) == downloads

    tiny_cap = IntakeLimits(max_bytes=100, max_pixels=LIMITS.max_pixels)
    with pytest.raises(ImageRefused, match="Send a smaller file"):  # a lie in the declaration
        await download(url, tiny_cap, origins, declared_size=50)

    streamed = cdn.upload("stream.png", SMALL_PNG * 3, chunked=True)  # no Content-Length
    assert await download(streamed, LIMITS, origins) == SMALL_PNG * 3
    small_cap = IntakeLimits(max_bytes=len(SMALL_PNG), max_pixels=LIMITS.max_pixels)
    with pytest.raises(ImageRefused, match="Send a smaller file"):  # stopped while streaming
        await download(streamed, small_cap, origins)

    moved = cdn.redirect(cdn.upload("elsewhere.png", SMALL_PNG))
    with pytest.raises(ImageRefused, match="leads somewhere else"):
        await download(moved, LIMITS, origins)
    with pytest.raises(ImageRefused, match="could not be downloaded"):
        await download(f"{cdn.base}/attachments/1/missing.png", LIMITS, origins)
