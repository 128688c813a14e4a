"""Image grids: the one way every stage shows samples (UI previews, MLflow artifacts)."""

import textwrap

from PIL import Image, ImageDraw, ImageFont

LINE = 11  # px per caption line of PIL's default bitmap font
CHAR = 6  # px per character of it


def image_grid(
    images: list[Image.Image],
    cols: int = 8,
    scale: int = 1,
    pad: int = 2,
    captions: list[str] | None = None,
) -> Image.Image:
    """Tile equally sized images into a grid, each upscaled `scale` times with nearest pixels;
    with `captions`, each image's caption (its prompt) is written under it."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"one caption per image: {len(captions)} for {len(images)} images")
    w, h = images[0].size
    w, h = w * scale, h * scale
    lines = [textwrap.wrap(c, max(w // CHAR, 1)) for c in captions] if captions else []
    text_h = max((len(ls) for ls in lines), default=0) * LINE
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    size = (cols * (w + pad) + pad, rows * (h + text_h + pad) + pad)
    grid = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, img in enumerate(images):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + text_h + pad)
        grid.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x, y + h + j * LINE), line, fill=(0, 0, 0), font=font)
    return grid
