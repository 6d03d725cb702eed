"""Where a model comes from: a hub id or a local folder, the commit it was loaded at, whether the
hub can be reached, and the errors that say what to do when a model cannot be had.

`workers.models` loads the models; what it cannot load is explained here, naming the model and
how to point the configuration at a local copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from schemas.config import SUBMITTED_CONFIG_ENV, ModelsConfig
from workers.exhaustion import shortage


def model_revision(model_config: Any, model_id: str, revision: str | None = None,
                   cache_dir: str | None = None) -> str | None:
    """The commit hash hub model `model_id` was loaded at (its `model_config` just loaded), when
    known (recorded in the runs table, and the text cache's key): the config's `_commit_hash`
    where transformers sets it, else the commit the local Hugging Face cache holds for `model_id`
    at `revision` (transformers 5 no longer sets it)."""
    return getattr(model_config, "_commit_hash", None) or hub_commit(model_id, revision, cache_dir)


#: a commit's folder in the Hugging Face cache (`.../snapshots/<40 hex>/<file>`).
_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]")


def hub_commit(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The commit of hub model `model_id` at `revision` (None: the default branch) in the local
    Hugging Face cache, where it was just loaded from; None for a local folder or where the cache
    cannot tell. Reads the cache only: no request to the hub."""
    if Path(model_id).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id, an odd cache: the commit is just unknown
        return None
    found = _SNAPSHOT.search(path) if isinstance(path, str) else None
    return found.group(1) if found else None


class HubUnreachable(ConnectionError):
    """A hub model is not in the local cache and the Hugging Face hub cannot be reached."""


def check_hub_reachable(model_id: str, revision: str | None, config: ModelsConfig) -> None:
    """Fail at once for a hub model missing from the local cache when the hub cannot be reached.

    The hub client retries each file of the model for about 25 s before giving up: offline, a
    run took 146 s to say that its model was missing. A cached model, a local folder, offline
    mode (HF_HUB_OFFLINE=1) and a hub that answers at all (any HTTP status) pass unchecked.
    """
    if _offline() or Path(model_id).exists() or _looks_like_path(model_id):
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    try:
        if try_to_load_from_cache(model_id, "config.json", cache_dir=config.cache_dir, revision=revision) is not None:
            return
    except Exception:  # noqa: BLE001 - not a valid repo id: transformers says so in its own words
        return
    if constants.ENDPOINT in _HUB_ANSWERED:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)  # once, without the client's retries
    except Exception as exc:  # noqa: BLE001 - whatever stops a connection stops the download too
        cache = config.cache_dir or constants.HF_HUB_CACHE
        raise HubUnreachable(f"it is not in the Hugging Face cache ({cache}) and the hub ({constants.ENDPOINT}) "
                             f"cannot be reached ({type(exc).__name__}: {exc})") from exc
    _HUB_ANSWERED.add(constants.ENDPOINT)


#: hub endpoints that answered this process (`check_hub_reachable` asks each once).
_HUB_ANSWERED: set[str] = set()


def _offline() -> bool:
    """Whether the Hugging Face libraries are in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
            or bool(constants.HF_HUB_OFFLINE))


#: the command line's flag of each model role (`vidlens run --caption-model`, not --captions-model)
_MODEL_FLAGS = {"embed": "--embed-model", "captions": "--caption-model"}


def explain_load_failure(model_id: str, role: str, exc: Exception) -> str:
    """Why model `model_id` (configuration key `role`) failed to load with `exc`, and what to do."""
    missing = missing_model_folder(model_id, role)
    if missing:  # transformers' own reason ("Repo id must be in the form ...") would only mislead here
        return missing
    offline = _offline()
    flag = _MODEL_FLAGS.get(role, f"--{role}-model")
    ran_out = shortage(exc)
    if ran_out is not None:  # (the folder's model is likely whole: "does not hold a loadable model" misled)
        hint = ran_out
    elif Path(model_id).exists():
        hint = (f"the folder {model_id} exists but does not hold a loadable model "
                "(it needs config.json and the weights saved with save_pretrained)")
    else:
        hint = (f"it is not a local folder, and downloading it from the Hugging Face hub failed"
                f"{' (offline mode is on)' if offline else ''}. On a machine with internet run "
                f"`hf download {model_id} --local-dir ./models/{model_id.split('/')[-1]}` "
                f"and copy that folder here, then set models.{role}: ./models/{model_id.split('/')[-1]} "
                f"in the config (or {flag} on the command line)")
    reason = str(exc).splitlines()[0].rstrip(". ") if str(exc).strip() else ""
    # (a MemoryError() says nothing: "MemoryError: . Fix" read as a word left out)
    said = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    return f"cannot load the {role} model {model_id!r}: {said}. Fix: {hint}."


def missing_model_folder(model_id: str, role: str, written_as_path: bool = False) -> str | None:
    """What is wrong, and what to do, where a model is a path (not a hub id) to nothing; else None.
    With `written_as_path`, only where it is written as one (/, ., ~, \\ or two slashes): an id
    owner/name beside a folder named owner is a hub id to a run that finds no such folder inside."""
    if Path(model_id).exists() or not _looks_like_path(model_id, written_as_path):
        return None
    expanded = os.path.expanduser(model_id)
    tilde = f" (~ is not expanded here: write {expanded})" if expanded != model_id and Path(expanded).exists() else ""
    if SUBMITTED_CONFIG_ENV in os.environ:  # (a job vidlens submit sent)
        # (its working folder is Ray's copy of the project: naming it told the user nothing to do)
        where = ("a job vidlens submit sent reads it on the cluster's nodes, which must have it at that path; a "
                 "relative one that did not exist where vidlens submit ran was sent as written, and starts in the "
                 "job's uploaded copy of vidlens: give the nodes' absolute path, or a hub id")
    else:
        where = f"a relative one starts from {os.getcwd()}"
    return (f"cannot load the {role} model: the folder {model_id} does not exist{tilde}. Fix: check the "
            f"path ({where}), or download the model into it first "
            f"(`hf download <hub id> --local-dir {model_id}` on a machine with internet), "
            f"then set models.{role} (or {_MODEL_FLAGS.get(role, f'--{role}-model')}) to that folder.")


def _looks_like_path(model_id: str, written_as_path: bool = False) -> bool:
    """A local path rather than a hub id ("owner/name"): starts with / . ~, has a backslash or more
    than one slash, or (unless `written_as_path`) starts with a folder that exists here
    ("models/clip" beside ./models)."""
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1:
        return True
    if written_as_path:
        return False
    head = model_id.split("/", 1)[0]
    return "/" in model_id and Path(head).is_dir()
