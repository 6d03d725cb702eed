"""The one line a failed command's error is told in (`said_of`): a failure the user can fix (a
configuration, a source, a model, a store that cannot be reached, a machine short of space or
memory, a Ray cluster that lost what a run needed), told with what to do; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import re

from pipeline.storage_errors import storage_problem
from pipeline.submit import SubmitError
from schemas.config import ConfigError
from workers.exhaustion import shortage
from workers.redaction import redact
from workers.storage import store_of


#: Ray's errors (and their kinds) for a node, worker, actor or object that the cluster lost and a run
#: could not go on without: no bug, so no traceback (a lost node ended a job with 100 lines, exit 1)
_RAY_LOST = {"NodeDiedError", "RayActorError", "ObjectLostError", "WorkerCrashedError", "LocalRayletDiedError"}


#: the same, as Ray names them in the text of an error it could not deserialize on the driver
#: (UnserializableException: "Original exception: ... ray.exceptions.ActorDiedError: The actor died ...")
_RAY_LOST_NAMED = re.compile(r"^ray\.exceptions\.(NodeDiedError|ActorDiedError|ActorUnavailableError|ObjectLostError|"
                             r"OwnerDiedError|ObjectReconstructionFailedError|WorkerCrashedError|"
                             r"LocalRayletDiedError): ?(.*)$", re.MULTILINE)


def _ray_lost(exc: BaseException) -> str | None:
    """The one line for a run that Ray failed because the cluster lost something it needed; else None."""
    kinds = [cls.__name__ for cls in type(exc).__mro__ if cls.__module__.startswith("ray.")]
    if set(kinds) & _RAY_LOST:
        kind = kinds[0]
        said = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    elif "UnserializableException" in kinds and (named := _RAY_LOST_NAMED.search(str(exc))):
        kind, said = named.group(1), named.group(2).strip()
    else:
        return None
    said = said.split(" This can happen", 1)[0]  # (Ray's guesses at the cause, and where to look)
    return (f"the Ray cluster lost a node, worker or actor the run could not go on without ({kind}"
            f"{': ' + said if said else ''}); the batches it published stay: run the same command again (a job: "
            f"vidlens submit it again) to go on from there")


def said_of(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one line a failure the user can fix is told in (bad config, missing source, unloadable
    model, a store that cannot be reached, a machine out of disk space, open files or memory:
    `shortage`); None for anything else, a bug, which keeps its traceback.
    (Not a job server's in a bucket's words: its message says what to check, and the connection
    error under it is no bucket's, which the videos and output URIs would have it named as.)"""
    lost = _ray_lost(exc)
    if lost is not None:
        return redact(lost)
    # (a run that listed videos had reached its stores: one unreachable since went down, and is not misconfigured)
    ran = getattr(exc, "run_summary", None)
    problem = None if isinstance(exc, SubmitError) else storage_problem(
        exc, storage_uris(args), anon=bool(getattr(args, "anon", None)),
        answered=ran is not None and ran.counts.get("videos_listed", 0) > 0)
    ran_out = None if problem else shortage(exc, getattr(args, "out", None))
    if problem is None and ran_out is None and not isinstance(exc, (ConfigError, ValueError, RuntimeError, OSError)):
        return None
    said = problem or str(exc) or type(exc).__name__
    if ran_out is not None and ran_out not in said:  # ("[Errno 28] No space left on device": not where, nor what to do)
        said = f"{ran_out}: {said}"
    return redact(said)


def storage_uris(args: argparse.Namespace) -> list[str]:
    """The bucket URLs the command was given (source, output), each once."""
    from pipeline.sources import is_remote

    uris = (getattr(args, name, None) for name in ("source", "out"))
    return list(dict.fromkeys(u for u in uris if isinstance(u, str) and is_remote(u)))


def stores_reached(args: argparse.Namespace) -> set[str] | None:
    """The stores ("s3", "gs", "az") the command's storage settings reach: its source's and output's;
    None where a manifest lists the videos, whose rows may name any store."""
    from pipeline.sources import is_manifest

    source = getattr(args, "source", None)
    if isinstance(source, str) and is_manifest(source):
        return None
    return {store_of(uri) for uri in storage_uris(args)}
