"""The run manifest (``OUT/manifest.json``): spec, versions, inputs, per-stage status and fingerprints.

A stage's fingerprint hashes what determines its outputs: its spec section, the fingerprint of the stage
before it and (for the first stage) the input fingerprints. A stage whose recorded status is ``complete``
with the same fingerprint, and whose outputs exist, is skipped. A stage found ``running`` with the same
fingerprint resumes (its committed parts are kept); any other stage start clears its outputs and those of
every later stage first, so stale files never mix with new ones.

The run directory may be a local path or a URI (``s3://bucket/run``, see :mod:`rebalance.data.fs`). On an
object store the same order makes it safe without renames: every file is published whole, a part's
summary after its Parquet file, and ``manifest.json`` (rewritten whole on every update) records a stage
``complete`` only after all its outputs are published. Before a stage's outputs are deleted for new work,
the manifest stops claiming them, so a crash half-way through a deletion never leaves a ``complete``
record over missing files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rebalance.data.atomic import atomic_write_json
from rebalance.data.fs import StoragePath, as_path, remove

__all__ = ["STAGES", "STAGE_OUTPUTS", "RunDir", "fingerprint", "package_versions", "check_run_dir"]

STAGES = ("embed", "cluster", "concepts", "balance", "report")
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("embeddings",),
    "cluster": ("clusters", "assignments"),
    "concepts": ("concepts",),
    "balance": ("weights", "balance.json"),
    "report": ("report",),
}

# Temporary names of rebalance.data.atomic: ``.NAME.tmp-PID`` (local) and ``.NAME.tmp-PID-RANDOM`` (remote).
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")


def check_run_dir(root: str | os.PathLike | StoragePath, keep: tuple[str, ...] = ()) -> None:
    """Refuse ``root`` as a run directory when it is a non-empty directory without ``manifest.json``: a run
    deletes its outputs when a stage starts afresh, and must never delete what it did not write. Entries
    named in ``keep`` (put there by the caller) and temporary files of a manifest write are allowed."""
    root = as_path(root)
    if not root.is_dir() or (root / "manifest.json").is_file():
        return
    found = sorted(
        path.name
        for path in root.iterdir()
        if path.name not in keep
        and not ((m := TEMPORARY.match(path.name)) and m.group("name") == "manifest.json")
    )
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise RuntimeError(
            f"{root} is not empty and holds no manifest.json, so it is not a run directory (it holds {shown}): "
            "give a new or empty directory as the run directory"
        )


def fingerprint(*parts: Any) -> str:
    """SHA-256 of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that determine results."""
    versions = {"python": platform.python_version()}
    for name in (
        "rebalance",
        "torch",
        "open_clip_torch",
        "ray",
        "faiss-cpu",
        "faiss-gpu",
        "numpy",
        "pyarrow",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class RunDir:
    """A run directory (local path or URI) and its manifest; every manifest update is an atomic rewrite."""

    def __init__(self, root: str | os.PathLike | StoragePath):
        self.root: Path | StoragePath = as_path(root)
        self.manifest_path = self.root / "manifest.json"
        if self.manifest_path.is_file():
            self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"stages": {}}

    @property
    def remote(self) -> bool:
        """Whether the run directory is on a remote filesystem (an object store)."""
        return isinstance(self.root, StoragePath)

    def path(self, *parts: str) -> Path | StoragePath:
        """A path inside the run directory (a :class:`~rebalance.data.fs.StoragePath` when remote)."""
        return self.root.joinpath(*parts)

    def stage(self, name: str) -> dict[str, Any]:
        """The manifest record of stage ``name`` (empty when it never ran)."""
        return self.manifest["stages"].get(name, {})

    def is_complete(self, name: str, stage_fingerprint: str) -> bool:
        """Whether stage ``name`` finished with this fingerprint and its outputs are all present."""
        record = self.stage(name)
        return (
            record.get("status") == "complete"
            and record.get("fingerprint") == stage_fingerprint
            and all(self.path(p).exists() for p in STAGE_OUTPUTS[name])
        )

    def begin(self, name: str, stage_fingerprint: str, **header: Any) -> None:
        """Mark stage ``name`` running; clear its and later stages' outputs unless resuming the same work.
        Temporary files that killed writers left in the stage's outputs (and of the manifest) are deleted."""
        self.remove_temporaries(STAGE_OUTPUTS[name] + ("manifest.json",))
        record = self.stage(name)
        resuming = (
            record.get("status") in ("running", "failed") and record.get("fingerprint") == stage_fingerprint
        )
        if not resuming:
            later = STAGES[STAGES.index(name) :]
            if any(s in self.manifest["stages"] for s in later):
                # Withdraw the records first: a crash during the deletions must not leave a complete
                # record over half-deleted outputs (deleting a directory is not atomic, least of all on an
                # object store).
                for stage in later:
                    self.manifest["stages"].pop(stage, None)
                self.save()
            for stage in later:
                for output in STAGE_OUTPUTS[stage]:
                    remove(self.path(output))
        self.manifest.update(header)
        self.manifest["stages"][name] = {
            "status": "running",
            "fingerprint": stage_fingerprint,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed": resuming,
        }
        self.save()

    def complete(self, name: str, info: dict[str, Any]) -> None:
        """Mark stage ``name`` complete with its summary ``info``."""
        record = self.manifest["stages"][name]
        record.update(info)
        record["status"] = "complete"
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

    def fail(self, name: str, error: str) -> None:
        """Record that stage ``name`` failed (its committed parts are kept for a resume)."""
        record = self.manifest["stages"].setdefault(name, {})
        record.update(status="failed", error=error)
        self.save()

    def remove_temporaries(self, outputs: tuple[str, ...]) -> list[str]:
        """Delete the temporary files (``.NAME.tmp-PID[-RANDOM]``) of dead writers in or beside the outputs
        named ``outputs``; returns their paths relative to the run directory.

        Two runs never write to one run directory at once (docs/run-directory.md), so when a stage starts
        every writer of its outputs is gone: on an object store every temporary object is deleted. On local
        disk a file is kept while a process with its PID is alive on this machine (it may be a writer that
        has not yet exited)."""
        removed = []
        for output in outputs:
            target = self.path(output)
            if self.remote:
                beside = [p for p in self.root.iterdir() if _temporary_of(p.name, output)]
                below = [target / rel for rel, _ in target.walk_files()] if target.is_dir() else []
            else:
                beside = [p for p in self.root.glob(f".{output}.tmp-*") if _temporary_of(p.name, output)]
                below = [Path(d) / f for d, _, files in os.walk(target) for f in files]
            for path in beside + below:
                match = TEMPORARY.match(path.name)
                if match and (self.remote or not _alive(int(match.group("pid")))):
                    path.unlink(missing_ok=True)
                    removed.append(str(path.relative_to(self.root)))
        return removed

    def save(self) -> None:
        """Rewrite ``manifest.json`` atomically."""
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest, self.manifest_path)


def _temporary_of(name: str, output: str) -> bool:
    match = TEMPORARY.match(name)
    return bool(match) and match.group("name") == output


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (this one's own writers included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
