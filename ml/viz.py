"""Image grids: the one way every stage shows samples (UI previews, MLflow artifacts)."""

from PIL import Image


def image_grid(
    images: list[Image.Image], cols: int = 8, scale: int = 1, pad: int = 2
) -> Image.Image:
    """Tile equally sized images into a grid, each upscaled `scale` times with nearest pixels."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    w, h = w * scale, h * scale
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        tile = img.convert("RGB").resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid
