"""Upload a finished run folder to the Hugging Face Hub as a dataset repo.

    uvd push out/laion me/uvd-laion [--private]

The repo is created when missing (`HfApi.create_repo(repo_type="dataset", exist_ok=True)`) and the
folder goes up in one commit (`HfApi.upload_folder`), without the work cache (`_work/`,
`_uvd/work/`) and temp files. Only a run whose manifest says `complete` is pushed.
"""
from __future__ import annotations

import logging
from pathlib import Path

from uvd import manifest as M
from uvd.storage import is_uri

log = logging.getLogger(__name__)

# Never uploaded: the per-input token cache (old and new run layout) and atomic-write temp files.
# _uvd/ is the run's bookkeeping (lock, per-part records, token work files): not part of the dataset.
IGNORE_PATTERNS = ["_uvd/*", "_uvd/**", "*.tmp", "**/*.tmp", "**/.*.tmp"]


def push_run(run: str | Path, repo_id: str, private: bool = False, message: str | None = None,
             endpoint: str | None = None, token: str | None = None) -> str:
    """Create dataset repo `repo_id` if needed and upload the run folder -> the commit's URL."""
    if is_uri(run):
        raise ValueError(f"{run}: `uvd push` uploads a local run folder; copy an object-store run down first "
                         "(e.g. `aws s3 sync`)")
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run folder")
    manifest = M.read_manifest(run)
    if manifest is None:
        raise ValueError(f"{run}: not a UVD run folder (no {M.MANIFEST}); push the folder `uvd run --out` wrote")
    status = manifest.get("status")
    if status != "complete":
        raise ValueError(f"{run}: the run's status is {status!r}, not 'complete'; finish it first "
                         f"(re-run the same `uvd run` to resume)")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id: {repo_id!r} is not a repo name such as me/uvd-laion")
    from huggingface_hub import HfApi, get_token

    # The token read now (HF_TOKEN, then `hf auth login`'s file), passed on explicitly to every call.
    api = HfApi(endpoint=endpoint, token=token or get_token())
    repo = api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private or None)
    log.info("uploading %s to %s", run, repo)
    sentences = sum(int(s.get("sentences", 0)) for s in manifest.get("shards", {}).values())
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=run, repo_type="dataset", ignore_patterns=IGNORE_PATTERNS,
        commit_message=message or f"UVD run of source {manifest.get('source')}: {sentences:,} sentences",
    )
    return commit.commit_url
