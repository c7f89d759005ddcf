"""Pushing the exported folder to the Hugging Face Hub.

The token comes from HF_TOKEN or the user's saved login (`hf auth login`), never from params.yaml,
so it cannot end up in git, DVC metrics or experiment tables. It is handed to huggingface_hub only
and scrubbed from any error text we print.
"""
from __future__ import annotations

from pathlib import Path

from .errors import SpeedrunError


class PushError(SpeedrunError):
    """The push cannot start (no token, no repo) or the Hub refused it."""


def check_repo_id(repo_id: str) -> str | None:
    """params check: empty (export only) or a valid 'user/name'."""
    if not repo_id:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in repo_id:
        return "must be 'user/name' (or 'org/name')"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"is not a valid Hub repo id ({str(e).splitlines()[0]})"
    return None


def resolve_token() -> str:
    """HF_TOKEN, else the saved login; PushError (one line) if neither exists."""
    from huggingface_hub import get_token

    token = get_token()  # reads HF_TOKEN first, then the token file of `hf auth login`
    if not token:
        raise PushError("export.push is true but no Hugging Face token was found: set HF_TOKEN or "
                        "run `hf auth login` (the token is never read from params.yaml)")
    return token


def push_folder(folder: Path, repo_id: str, private: bool, token: str,
                message: str = "Upload speedrun GPT") -> str:
    """Create the repo if needed and upload `folder` as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=message)
    except Exception as e:  # HTTP, network and validation errors alike: one line, token-free
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(token, "***")
        raise PushError(f"push of {folder} to {api.endpoint}/{repo_id} failed: {first}") from None
    return str(getattr(info, "commit_url", info))
