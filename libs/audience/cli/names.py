"""How commands name resources: an id within ``--dataset``, or a full resource name.

A command decorated with :data:`DATASET_OPTION` takes ``--dataset`` (or
``AUDIENCE_DATASET``) once; each resource it is given is then either an id within that
dataset (``vip``) or a full resource name (``datasets/shop/segments/vip``), which carries
its own dataset and needs no ``--dataset``.
"""

from __future__ import annotations

import click

__all__ = ["DATASET_OPTION", "dataset_name", "resource_name"]

DATASET_OPTION = click.option(
    "--dataset",
    envvar="AUDIENCE_DATASET",
    default="",
    help="The dataset of ids given without a full name (or AUDIENCE_DATASET).",
)


def dataset_name(dataset: str) -> str:
    """``datasets/{dataset}``; a usage error when no dataset was given."""
    if not dataset:
        raise click.UsageError("give --dataset (or AUDIENCE_DATASET)")
    return f"datasets/{dataset}"


def resource_name(value: str, dataset: str, collection: str) -> str:
    """VALUE when it is a full resource name, else the name of id VALUE in COLLECTION of
    DATASET; a usage error when VALUE is an id and no dataset was given."""
    if value.startswith("datasets/"):
        return value
    if not dataset:
        raise click.UsageError(
            f"{value!r} is an id: give --dataset (or AUDIENCE_DATASET), or the full name, "
            f"datasets/{{dataset}}/{collection}/{value}"
        )
    return f"datasets/{dataset}/{collection}/{value}"
