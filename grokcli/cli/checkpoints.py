"""`grok download` and `grok verify-checkpoint`: parse, one library call, render."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import EXIT_RUNTIME, app, usage_error
from .options import CheckpointOpt, CommonOptions, JsonOpt, ModelOpt, QuietOpt, with_option_groups

DOWNLOAD_PANEL = "Download"
VERIFY_PANEL = "Verification"


@app.command("download", rich_help_panel="Checkpoints")
@with_option_groups
def download_cmd(
    repo: Annotated[str, typer.Option("--repo", envvar="GROK_REPO", rich_help_panel=DOWNLOAD_PANEL,
                                      help="Hugging Face repository to download from.")] = "xai-org/grok-1",
    revision: Annotated[str, typer.Option("--revision", rich_help_panel=DOWNLOAD_PANEL,
                                          help="Branch, tag or commit of the repository.")] = "main",
    local_dir: Annotated[Optional[Path], typer.Option(
        "--local-dir", "--checkpoint", "-c", envvar="GROK_CHECKPOINT", show_default=False,
        rich_help_panel=DOWNLOAD_PANEL,
        help="Where to put the checkpoint (ckpt-0/, tokenizer.model, manifest.json). "
             "Default: where the other commands look for Grok-1.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", show_default=False, rich_help_panel=DOWNLOAD_PANEL,
        help="Only files matching this glob (repo or local path, e.g. 'ckpt-0/tensor0000*'); repeatable.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", show_default=False, rich_help_panel=DOWNLOAD_PANEL,
        help="Skip files matching this glob; repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=DOWNLOAD_PANEL,
        help="List what would be fetched and its size (on stdout); fetch nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", rich_help_panel=DOWNLOAD_PANEL,
        help="Download even when the free disk space looks too small.")] = False,
    max_workers: Annotated[int, typer.Option(
        "--max-workers", min=1, rich_help_panel=DOWNLOAD_PANEL, help="Files fetched at once.")] = 8,
    stall_timeout: Annotated[Optional[float], typer.Option(
        "--stall-timeout", min=0.001, max=1e6, envvar="GROK_DOWNLOAD_STALL_TIMEOUT", show_default=False,
        rich_help_panel=DOWNLOAD_PANEL,
        help="Abandon a file that receives less than one 10 MiB block in this many seconds. Default: 120.")] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    common: CommonOptions = None,
) -> None:
    """Download Grok-1 from the Hugging Face Hub: only the tensors and tokenizer.model, resumable.

    Respects HF_ENDPOINT and HF_TOKEN, and uses hf_xet when installed. Run the same
    command again after an interruption: complete files are kept and only the rest is fetched.
    """
    from .. import download as dl
    from .. import tui

    plan = dl.plan_download(repo, revision=revision, local_dir=local_dir, include=include or (),
                            exclude=exclude or ())
    if dry_run:
        if json_out:
            sys.stdout.write(json.dumps(plan_json(plan), indent=2) + "\n")
        else:
            tui.print_download_plan(plan)
        return
    result = None
    if plan.to_fetch:
        if not quiet:
            tui.print_download_start(plan)
        with tui.TransferProgress("downloading", quiet=quiet) as display:
            result = dl.download(plan, force=force, max_workers=max_workers, stall_timeout=stall_timeout,
                                 on_progress=lambda p: display.update(p.bytes_done, p.bytes_total,
                                                                      p.files_done, p.files_total))
    if not quiet or result is not None:
        tui.print_download_result(plan, result, quiet=quiet)
    if json_out:
        sys.stdout.write(json.dumps({"repo_id": plan.repo_id, "revision": plan.revision,
                                     "local_dir": str(plan.local_dir),
                                     "fetched": list(result.fetched) if result else [],
                                     "warnings": list(result.warnings) if result else []}, indent=2) + "\n")


def plan_json(plan) -> dict:
    return {"repo_id": plan.repo_id, "revision": plan.revision, "local_dir": str(plan.local_dir),
            "files": [{"path": f.path, "source": f.source, "size": f.size, "sha256": f.sha256,
                       "present": f.path in plan.present} for f in plan.selected],
            "bytes_to_fetch": plan.bytes_to_fetch}


@app.command("verify-checkpoint", rich_help_panel="Checkpoints")
@with_option_groups
def verify_checkpoint_cmd(
    directory: Annotated[Optional[Path], typer.Argument(
        metavar="[DIR]", show_default=False,
        help="Checkpoint directory. Default: $GROK_CHECKPOINT, else where `grok download` puts Grok-1.")] = None,
    checkpoint: CheckpointOpt = None,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, show_default=False, rich_help_panel=VERIFY_PANEL,
        help="Files hashed in parallel. Default: all cores.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", rich_help_panel=VERIFY_PANEL,
        help="Existence and sizes only (seconds, even for 300 GB); no hashing or parsing.")] = False,
    fail_on_extra: Annotated[bool, typer.Option(
        "--fail-on-extra", rich_help_panel=VERIFY_PANEL,
        help="Treat unexpected extra files as failures, not warnings.")] = False,
    write_manifest: Annotated[bool, typer.Option(
        "--write-manifest", rich_help_panel=VERIFY_PANEL,
        help="Record sizes and SHA-256 of this (known-good) copy in manifest.json when every check passes.")] = False,
    model: ModelOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    common: CommonOptions = None,
) -> None:
    """Check a checkpoint: every file present, sizes and SHA-256 against the manifest, structure, tokenizer.

    Exit code 0 when everything passes, 1 when anything fails, 2 for usage errors. A SHA256SUMS
    file (sha256sum format) is accepted when there is no manifest.json.
    """
    from .. import tui
    from ..paths import resolve_checkpoint
    from ..verify import verify_checkpoint

    if directory is not None and checkpoint is not None:
        raise usage_error("give the directory either as an argument or with --checkpoint, not both", "--checkpoint")
    target = resolve_checkpoint(directory or checkpoint, model).checkpoint
    with tui.TransferProgress("verifying", quiet=quiet or quick) as display:
        report = verify_checkpoint(target, jobs=jobs, quick=quick, fail_on_extra=fail_on_extra,
                                   write_manifest_file=write_manifest,
                                   on_progress=lambda p: display.update(p.bytes_done, p.bytes_total,
                                                                        p.files_done, p.files_total))
    if json_out:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    tui.print_verify_report(report, target, quick=quick, quiet=quiet)
    if not report.ok:
        raise typer.Exit(EXIT_RUNTIME)
