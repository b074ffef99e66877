"""Draw the studio's icon (ui-assets/rfstudio-256.png, -48.png): a rounded square in the
Available class's green with a product silhouette on a canvas frame and "rf" in white.
Run with Pillow: python scripts/make_icon.py"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

root = Path(__file__).resolve().parent.parent
font = ImageFont.truetype(str(root / "ui-assets/wqy-microhei.ttf"), 104)


def draw(size: int = 1024) -> Image.Image:
    s = size / 256
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle([8 * s, 8 * s, 248 * s, 248 * s], radius=48 * s, fill=(0, 158, 115, 255))
    # the canvas frame the product is placed on
    d.rounded_rectangle([40 * s, 40 * s, 216 * s, 216 * s], radius=20 * s, outline=(255, 255, 255, 200), width=int(8 * s))
    # the product: a bottle silhouette in the Space Mismatch orange
    d.rounded_rectangle([150 * s, 110 * s, 196 * s, 196 * s], radius=12 * s, fill=(230, 159, 0, 255))
    d.rectangle([164 * s, 88 * s, 182 * s, 112 * s], fill=(230, 159, 0, 255))
    f = ImageFont.truetype(str(root / "ui-assets/wqy-microhei.ttf"), int(104 * s))
    d.text((58 * s, 74 * s), "rf", font=f, fill=(255, 255, 255, 255))
    return im


big = draw()
for px in (256, 48):
    big.resize((px, px), Image.LANCZOS).save(root / f"ui-assets/rfstudio-{px}.png", optimize=True)
