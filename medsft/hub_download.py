"""Downloads from ModelScope and the Hugging Face Hub: bounded retries, the cache when offline, one-line errors.

Mirrors and caches are the SDKs' own settings: MODELSCOPE_ENDPOINT (the deprecated MODELSCOPE_DOMAIN still
works) and MODELSCOPE_CACHE; HF_ENDPOINT and HF_HOME.
"""
import os
import time
from pathlib import Path

from medsft.errors import UserError

HUB_ATTEMPTS = 2              # tries of a hub's first request (the file listing) before giving up on that hub
HUB_TIMEOUT_S = 4             # connect and read timeout of each try: 2 tries + a 1 s pause stay within ~10 s a hub
MODELSCOPE_DEFAULT_REVISION = "master"  # the branch ModelScope's SDK downloads when no revision is given

# modelscope-hub reads these when it is first imported; a value the user set wins
_MODELSCOPE_BOUNDS = {
    "MODELSCOPE_API_MAX_RETRIES": HUB_ATTEMPTS - 1,           # API calls (the site probe when no endpoint is set)
    "MODELSCOPE_API_CONNECT_TIMEOUT": HUB_TIMEOUT_S,
    "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": HUB_ATTEMPTS,   # the file listing, the first request of a download
    "MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS": HUB_TIMEOUT_S,
}


def modelscope_endpoint() -> str:
    """MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN, else modelscope.cn (modelscope.ai with MODELSCOPE_PREFER_AI_SITE).

    Passed to the SDK explicitly: without an endpoint it first probes both sites, up to 4 s each when offline.
    """
    url = os.environ.get("MODELSCOPE_ENDPOINT", "").strip() or os.environ.get("MODELSCOPE_DOMAIN", "").strip()
    if not url:
        prefer_ai = os.environ.get("MODELSCOPE_PREFER_AI_SITE", "").strip().lower() in ("1", "true", "yes", "on")
        return "https://www.modelscope.ai" if prefer_ai else "https://modelscope.cn"
    return (url if url.startswith(("http://", "https://")) else f"https://{url}").rstrip("/")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_offline() -> str:
    """'HF_HUB_OFFLINE=1' (or the older TRANSFORMERS_OFFLINE) when the user's setting keeps huggingface_hub to its
    cache, as the library reads it; else ''."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name, "").strip()
        if value.upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return ""


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _import_modelscope():
    for name, value in _MODELSCOPE_BOUNDS.items():
        os.environ.setdefault(name, str(value))
    # what modelscope's snapshot_download delegates to, without the torch import of `import modelscope`
    from modelscope_hub.compat.snapshot_download import snapshot_download

    return snapshot_download


def _failure(e: BaseException) -> str:
    """'not_found', 'offline' (no answer, or a server error) or 'other', from the exception and its causes."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        name = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if name in ("NotExistError", "RepositoryNotFoundError", "RevisionNotFoundError") or status == 404:
            return "not_found"
        if name in ("NetworkError", "RequestTimeoutError", "ServerError", "ConnectError", "ConnectTimeout",
                    "ReadTimeout", "TimeoutException", "ConnectionError", "Timeout") or (status or 0) >= 500:
            return "offline"
        e = e.__cause__ or e.__context__
    return "other"


def _cached(folder: str, hub: str, url: str) -> str:
    print(f"{hub} ({url}) did not answer; using the cached copy in {folder}", flush=True)
    return folder


def _one_line(hub: str, url: str, what: str, e: Exception) -> str:
    kind = _failure(e)
    if kind == "not_found":
        return f"{hub} ({url}) has no {what}"
    if kind == "offline":
        attempts, timeout = HUB_ATTEMPTS, HUB_TIMEOUT_S
        if hub == "ModelScope":  # the settings it ran with: ours, or the user's
            attempts = os.environ["MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS"]
            timeout = os.environ["MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS"]
        return f"{hub} ({url}) did not answer for {what}: {attempts} attempts, {timeout} s timeout each"
    return f"{hub} ({url}) failed on {what} ({type(e).__name__})"


def download_dataset(dataset_id: str, revision: str = "") -> tuple[Path, str]:
    """The dataset's raw files from ModelScope (or its cache when ModelScope does not answer), and the revision."""
    revision = revision or MODELSCOPE_DEFAULT_REVISION
    try:
        snapshot_download = _import_modelscope()
    except ImportError:
        raise UserError("error: modelscope is not installed (pip install -r requirements.txt), "
                        "or pass a local file with --source=PATH") from None
    url = modelscope_endpoint()
    try:
        folder = snapshot_download(repo_id=dataset_id, repo_type="dataset", revision=revision, endpoint=url)
        return Path(folder), revision
    except Exception as e:  # network, missing-dataset and server errors all come as different types
        error = e
    if _failure(error) == "offline":
        try:
            return Path(_cached(snapshot_download(repo_id=dataset_id, repo_type="dataset", revision=revision,
                                                  local_files_only=True), "ModelScope", url)), revision
        except Exception:
            pass
    what = f"dataset {dataset_id!r} at revision {revision!r}"
    advice = "Offline? Pass" if _failure(error) == "offline" else "Check the id and --revision, or pass"
    raise UserError(f"error: {_one_line('ModelScope', url, what, error)}. {advice} a local file in the same schema: "
                    "--source=data/sample.jsonl") from None


def download_model(model_id: str, allow_patterns: list[str]) -> str:
    """The model's files matching allow_patterns: from ModelScope, else from the Hugging Face Hub."""
    errors, what = [], f"model {model_id!r}"
    try:
        snapshot_download = _import_modelscope()
        print(f"downloading {model_id} from ModelScope ...", flush=True)
        return snapshot_download(model_id, allow_patterns=allow_patterns, endpoint=modelscope_endpoint())
    except ImportError:
        errors.append("ModelScope: modelscope is not installed")
    except Exception as e:
        errors.append(_one_line("ModelScope", modelscope_endpoint(), what, e))
        if _failure(e) == "offline":
            try:
                return _cached(snapshot_download(model_id, allow_patterns=allow_patterns, local_files_only=True),
                               "ModelScope", modelscope_endpoint())
            except Exception:
                pass
    try:
        print(f"downloading {model_id} from the Hugging Face Hub ...", flush=True)
        return _hub_snapshot(model_id, allow_patterns)
    except Exception as e:
        if hub_offline():  # the library looked in its cache only, and did not find it there
            errors.append(f"the Hugging Face Hub was not asked: {hub_offline()} is set (offline mode), and its cache "
                          f"({_hub_cache()}) has no {what}; unset {hub_offline().split('=')[0]} to download it")
        else:
            errors.append(_one_line("the Hugging Face Hub", hub_endpoint(), what, e))
    raise UserError(f"error: could not get {what}: " + "; ".join(errors)
                    + ". Check the spelling, or download it yourself and pass its folder: --model_path=/path/to/model")


def _hub_snapshot(model_id: str, allow_patterns: list[str]) -> str:
    """huggingface_hub's snapshot download, after resolving main to a commit with bounded tries: the library
    itself asks that first question with no timeout and no retry."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:  # the cache only, as the library does it
        return snapshot_download(model_id, allow_patterns=allow_patterns)
    for attempt in range(HUB_ATTEMPTS):
        try:
            commit = HfApi().model_info(model_id, revision="main", timeout=HUB_TIMEOUT_S).sha
            break
        except Exception as e:
            if _failure(e) != "offline":
                raise
            if attempt == HUB_ATTEMPTS - 1:
                try:  # the last download of main, if any
                    return _cached(snapshot_download(model_id, allow_patterns=allow_patterns, local_files_only=True),
                                   "The Hugging Face Hub", hub_endpoint())
                except Exception:
                    raise e from None
            time.sleep(1)
    return snapshot_download(model_id, revision=commit, allow_patterns=allow_patterns, etag_timeout=HUB_TIMEOUT_S)
