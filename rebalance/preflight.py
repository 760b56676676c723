"""Checks that run before Ray starts: everything about a run that can fail without doing any work.

:func:`check_run` is called by :func:`rebalance.api.run` with the spec, the run directory and the listed
shards, before a Ray instance is started or joined; each failure is one :class:`SpecError` (a spec field) or
:class:`UsageError` (an argument such as ``--out``), which the CLI prints as one line and exits with 2.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq

from rebalance.data.fs import StoragePath, as_path, read_table
from rebalance.data.rows import Shard
from rebalance.runtime.manifest import check_run_dir
from rebalance.spec import EmbedSpec, Spec, SpecError

__all__ = [
    "UsageError",
    "check_model",
    "check_run",
    "check_run_directory",
    "check_vocabulary_matches",
    "known_row_count",
]

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """An argument that cannot work (a run directory that cannot be created or written)."""


def check_run(
    spec: Spec,
    out: str | os.PathLike | StoragePath,
    shards: list[Shard],
    sides: list[str],
    embed: bool,
    keep: tuple[str, ...] = (),
    cluster: bool = True,
    model: bool = True,
) -> None:
    """Every check that needs no Ray: the model and its weights (when the embed stage will run and
    ``model``: the run encodes images, captions or zero-shot prompts; precomputed vectors need none), k of
    each of the dataset's ``sides`` against the rows the inputs' metadata declares (when the cluster stage
    will run), and the run directory (last: it may create the directory; ``keep`` as in
    :func:`check_run_directory`)."""
    if embed:
        if model:
            check_model(spec.embed)
        check_vocabulary_matches(spec, shards)
    rows = known_row_count(shards) if cluster else None
    if rows is not None:
        for side in sides:
            k = getattr(spec.cluster, side).k
            if k != "auto" and k > rows:
                raise SpecError(
                    f"cluster.{side}.k",
                    f"exceeds the {rows} rows the dataset's metadata declares; set it to at most {rows}",
                    k,
                )
    check_run_directory(out, keep)


VOCABULARY_SAMPLE_ROWS = 10_000


def check_vocabulary_matches(
    spec: Spec, shards: list[Shard], rows: int = VOCABULARY_SAMPLE_ROWS
) -> int | None:
    """Match ``concepts.vocabulary`` against the ``concepts.field`` of the first ``rows`` rows of Parquet
    shards, before anything is embedded; a vocabulary that matches none of them is logged as a warning that
    names the file, the field and the ``concepts.unmatched`` policy every unmatched row will follow. Returns
    the rows that matched, or None when nothing was checked (no vocabulary, shards that are not Parquet, or
    a field the files do not hold: a carried column the reader derives)."""
    from rebalance.kernels.concepts import build_matcher, match_captions
    from rebalance.spec import read_entries

    concepts = spec.concepts
    if concepts is None or concepts.vocabulary is None or not shards or shards[0].kind != "parquet":
        return None
    captions: list[str | None] = []
    for shard in shards:
        if len(captions) >= rows:
            break
        try:
            table = read_table(shard.path, columns=[concepts.field])
        except Exception:  # a missing column or an unreadable shard: the embed stage says what is wrong
            return None
        captions += [
            None if v is None else str(v) for v in table.column(0).to_pylist()[: rows - len(captions)]
        ]
    automaton = build_matcher(read_entries(concepts.vocabulary, "concepts.vocabulary"), concepts.case_fold)
    matched = sum(bool(m) for m in match_captions(captions, automaton, concepts.case_fold))
    if matched == 0:
        policy = "kept as one entry '<none>'" if concepts.unmatched == "entry" else "dropped (weight 0)"
        log.warning(
            "concepts.vocabulary %s matches none of the first %d values of field %r: unmatched rows are %s "
            "(concepts.unmatched: %s); check the file and the field before the embedding",
            concepts.vocabulary, len(captions), concepts.field, policy, concepts.unmatched,
        )  # fmt: skip
    return matched


def check_model(embed: EmbedSpec) -> None:
    """``embed.model`` is an open_clip model (a registered name, a shipped config, ``hf-hub:`` or
    ``local-dir:``) and ``embed.pretrained`` a local checkpoint that exists or a tag open_clip knows for it.
    A tag whose weights are not in this machine's cache is logged as a download this machine must make, and
    is an error when ``HF_HUB_OFFLINE`` is set (the download cannot happen)."""
    import open_clip

    from rebalance.models import TINY_MODEL, TINY_TAG

    name, pretrained = embed.model, embed.pretrained
    if name.startswith("local-dir:"):
        if not Path(name.removeprefix("local-dir:")).is_dir():
            raise SpecError("embed.model", "local-dir: directory does not exist", name)
        return
    if name.startswith("hf-hub:"):
        return
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SpecError(
            "embed.model", f"not an open_clip model (open_clip.list_models(), or {TINY_MODEL!r}){hint}", name
        )
    if pretrained is None or (name == TINY_MODEL and pretrained == TINY_TAG):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained.lower() in (t.lower() for t in tags):
        cached = _cached_weights(open_clip.get_pretrained_cfg(name, pretrained))
        if cached is None:
            where = "set embed.pretrained to a local checkpoint (.pt, .bin or .safetensors)"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise SpecError(
                    "embed.pretrained",
                    f"the weights of {name} {pretrained!r} are not in this machine's cache and HF_HUB_OFFLINE "
                    f"is set, so they cannot be downloaded; download them elsewhere and {where}",
                    pretrained,
                )
            log.warning(
                "embed.pretrained %r: the weights of %s are not in this machine's cache; every embed worker "
                "must download them (without network access, %s)",
                pretrained, name, where,
            )  # fmt: skip
        return
    if Path(pretrained).is_file():
        return
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        raise SpecError("embed.pretrained", "checkpoint file does not exist", pretrained)
    known = ", ".join(tags) if tags else "none"
    raise SpecError(
        "embed.pretrained",
        f"neither an existing checkpoint file nor a pretrained tag of {name} (its tags: {known})",
        pretrained,
    )


def _cached_weights(cfg: dict) -> str | None:
    """The local file open_clip would load for pretrained config ``cfg`` without a download, or None."""
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename or "open_clip_pytorch_model.bin"]
        if names[0].endswith((".bin", ".pth")):
            names.insert(0, names[0][:-4] + ".safetensors")
        if names[0] == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
        if not cfg.get("url"):
            return None
    url = cfg.get("url", "")
    if url:
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(target) if target.is_file() else None
    return None


def known_row_count(shards: list[Shard]) -> int | None:
    """Rows of the dataset as its metadata declares them (an upper bound on the rows that get embedded:
    rejected rows are not known before reading), or None when not every shard declares its rows (tars,
    remote files). Parquet files from their footers, image folders from their listings."""
    total = 0
    for shard in shards:
        if shard.kind == "folder":
            total += sum(not f.endswith(".txt") for f in shard.files)
        elif shard.kind == "parquet" and not isinstance(as_path(shard.path), StoragePath):
            try:
                total += pq.ParquetFile(shard.path).metadata.num_rows
            except Exception:  # an unreadable shard is rejected while embedding, not here
                return None
        else:
            return None
    return total


def check_run_directory(out: str | os.PathLike | StoragePath, keep: tuple[str, ...] = ()) -> None:
    """``out`` can serve as a run directory: not a non-empty directory of something else
    (:func:`rebalance.runtime.manifest.check_run_dir`, ``keep`` the entries the caller put there), and it
    can be created and written: it is created here when missing (its parents too). Messages say why not: a
    path under a regular file, a filesystem that refuses new entries (``/proc``), a read-only filesystem,
    missing permissions. The store of a remote run directory is checked by
    :func:`rebalance.data.fs.check_location`."""
    check_run_dir(out, keep)
    path = as_path(out)
    if isinstance(path, StoragePath):
        return
    path = Path(os.path.abspath(path))
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        where = "is" if ancestor == path else f"is under {ancestor}, which is"
        raise UsageError(f"--out {path} {where} a regular file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        reason = {
            errno.EACCES: "no permission to create entries there",
            errno.EPERM: "no permission to create entries there",
            errno.EROFS: "that filesystem is read-only",
            errno.ENOENT: "that filesystem does not allow creating directories",
        }.get(err.errno, f"that filesystem refuses new directories ({err.strerror})")
        raise UsageError(f"--out {path}: cannot create the run directory in {parent}: {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: the run directory is not writable by this user")
