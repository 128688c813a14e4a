"""Metadata shown in the Dagster UI, built the same way for every asset."""

import base64
import io

import dagster as dg
from PIL import Image


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def captioned_images(rows: list[tuple[Image.Image, str]], scale: int = 3) -> dg.MetadataValue:
    """A Markdown table of images beside their captions, rendered inline by the Dagster UI."""
    lines = ["| image | caption |", "|---|---|"]
    for image, caption in rows:
        big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        text = caption.replace("|", "\\|").replace("\n", " ") or "*(empty)*"
        lines.append(f"| ![]({png_data_uri(big)}) | {text} |")
    return dg.MetadataValue.md("\n".join(lines))


def markdown_image(image: Image.Image) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![]({png_data_uri(image)})")


def markdown_table(rows: list[dict[str, object]]) -> dg.MetadataValue:
    """Rows of equal keys as a Markdown table; floats to 3 decimals."""
    if not rows:
        return dg.MetadataValue.md("*(no rows)*")
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))
