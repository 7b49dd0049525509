"""`skindistil push`: upload a model artifact to the Hugging Face Hub (timm reads it there as it is)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model/ or run directory")
    p.add_argument("--repo", required=True, help="hub repository id OWNER/NAME (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="write the hub model card (README.md) and list the files; "
                                                          "upload nothing")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.models.hub import push_model

    result = push_model(args.model, args.repo, private=args.private, dry_run=args.dry_run)
    console = Console()
    files = ", ".join(result["files"])
    if result["url"] is None:
        console.print(f"[bold]ready[/bold] {result['folder']} for {result['repo']} ({files}); nothing uploaded")
    else:
        console.print(f"[bold]pushed[/bold] {result['folder']} to {result['repo']} ({files}): {result['url']}")
    return 0
