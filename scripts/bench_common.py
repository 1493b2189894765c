"""What the benchmark scripts share: the conversions they compare with their source."""

from pathlib import Path

# the settings the CPU recipes, the pipeline and the README use
CONVERSIONS = {
    "moh": dict(to="moh", router="learned"),
    "dha": dict(to="dha", kv_budget=0.5),
    "gda": dict(to="gda", ratio=3),
}


def conversions(source: str, work: Path, layouts=tuple(CONVERSIONS), **options) -> dict[str, str]:
    """{"source": source, layout: folder}; each conversion is made into ``work`` unless it is there."""
    out = {"source": str(source)}
    for layout in layouts:
        folder = Path(work) / f"{Path(source).name}-{layout}"
        if not (folder / "config.json").is_file():
            from rehead.convert import convert  # only when one is missing (gpu_check's decode runs uninstalled)

            convert(str(source), folder, **CONVERSIONS[layout], **options)
        out[layout] = str(folder)
    return out
