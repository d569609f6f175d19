#!/usr/bin/env python
"""JPEG decoders side by side: which ones see damage, and how fast they decode a 1352x1080 frame.

    python benchmarks/jpeg_decode.py [--rounds 7] [--flips 200]

Candidates: PIL (what the toolkit used), ``torchvision.io.decode_jpeg``, and libjpeg-turbo through ``simplejpeg`` with
``strict=True`` (what ``surgvqa.media.decode_image`` uses: libjpeg's corrupt-data warnings become errors). Damage:
the scan with its middle third cut out (the file still ends with its end marker), the file cut in half, and
``--flips`` single-bit errors at random scan positions (each its own file). A flip inside a coefficient's magnitude
bits changes one 8x8 block and is invisible to every decoder, so the flip rows also count the flips that visibly
damage the frame (> 1 % of pixels off by more than 16 levels) and how many of those each decoder refuses.
Speed: median of ``--rounds`` alternating rounds of 10 decodes each, one thread.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment_line, print_table  # noqa: E402


def frame(width: int = 1352, height: int = 1080, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1) + rng.integers(0, 40, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decoders():
    import numpy as np
    import simplejpeg
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    def pil(data: bytes):
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    def tv(data: bytes):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()

    def strict(data: bytes):
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)

    return {"PIL": pil, "torchvision decode_jpeg": tv, "simplejpeg strict (surgvqa)": strict}


def decodes(decode, data: bytes) -> bool:
    try:
        decode(data)
    except Exception:  # noqa: BLE001 - any error is a refusal
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import simplejpeg
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--flips", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(environment_line())
    good = frame()
    sos = good.index(b"\xff\xda")
    first, end = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big"), len(good) - 2
    third = (end - first) // 3
    damaged = {
        "mid-cut scan (ends with EOI)": good[:first + third] + good[first + 2 * third:],
        "file cut in half": good[:len(good) // 2],
    }
    reference = simplejpeg.decode_jpeg(good, strict=True).astype(int)
    rng = np.random.default_rng(1)
    flips = []
    while len(flips) < args.flips:
        data = bytearray(good)
        pos, bit = int(rng.integers(first, end)), 1 << int(rng.integers(0, 8))
        if 0xFF in (data[pos], data[pos - 1], data[pos] ^ bit):
            continue
        data[pos] ^= bit
        lax = simplejpeg.decode_jpeg(bytes(data), strict=False).astype(int)
        flips.append((bytes(data), (np.abs(lax - reference).max(-1) > 16).mean() > 0.01))
    visible = sum(v for _, v in flips)
    rows = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)  # libjpeg prints its warnings to stderr
    try:
        for name, decode in decoders().items():
            row = [name]
            row += ["refused" if not decodes(decode, d) else "DECODED" for d in damaged.values()]
            refused = [not decodes(decode, d) for d, _ in flips]
            row.append(f"{sum(refused)}/{len(flips)}")
            row.append(f"{sum(r for r, (_, v) in zip(refused, flips, strict=True) if v)}/{visible}")
            rows.append(row)
        times: dict[str, list[float]] = {name: [] for name in decoders()}
        for _ in range(args.rounds):
            for name, decode in decoders().items():
                start = time.perf_counter()
                for _ in range(10):
                    decode(good)
                times[name].append((time.perf_counter() - start) / 10 * 1000)
    finally:
        os.dup2(saved, 2)
    print_table(["decoder", *damaged, "single-bit flips refused", "visibly damaging flips refused"], rows,
                title="damage (1352x1080 frame, quality 90)")
    base = statistics.median(times["PIL"])
    print_table(["decoder", "ms / decode (median)", "speed vs PIL"],
                [[name, f"{statistics.median(t):.1f}", f"{base / statistics.median(t):.2f}x"]
                 for name, t in times.items()], title="speed (1352x1080, one thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
