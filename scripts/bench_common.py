"""What the benchmark scripts share: the conversions they compare with their source (the presets of the
pipeline recipe, recipes/pipeline/default.yaml, without its lighter settings)."""

from pathlib import Path


def conversions(source: str, work: Path, layouts=("moh", "dha", "gda"), **options) -> dict[str, str]:
    """{"source": source, layout: folder}; each conversion is made into ``work`` unless it is there."""
    out = {"source": str(source)}
    for layout in layouts:
        folder = Path(work) / f"{Path(source).name}-{layout}"
        if not (folder / "config.json").is_file():
            # imported only when a conversion is missing (gpu_check's decode runs where rehead is not installed)
            from rehead.app.pipeline import presets
            from rehead.convert import convert

            convert(str(source), folder, **{**presets()[layout], **options})  # options override the preset
        out[layout] = str(folder)
    return out
