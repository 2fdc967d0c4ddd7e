"""LoRAs from the Hugging Face Hub: `owner/repo` (the repo must hold exactly one `.safetensors` file) or
`owner/repo/sub/file.safetensors`, downloaded by huggingface_hub into its own cache (`HF_HOME`,
`HF_TOKEN` and `HF_HUB_OFFLINE` are honoured). Blocking: called from a worker thread."""

from __future__ import annotations

import os
from pathlib import Path

from server.fetch.errors import FetchFailure, human_bytes
from server.fetch.lora_paths import LoraSource
from server.fetch.safetensors_check import is_pickle_name


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.is_offline_mode()) or flag


def hub_file(source: LoraSource, max_bytes: int) -> Path:
    """The repo's LoRA file in the local Hugging Face cache, downloaded first if needed."""
    from huggingface_hub import HfApi, errors, hf_hub_download, snapshot_download

    offline = _offline()
    try:
        filename = source.file
        size: int | None = None
        if offline:
            if not filename:
                folder = Path(snapshot_download(source.repo, local_files_only=True))
                filename = _single(sorted(str(f.relative_to(folder)) for f in folder.rglob("*.safetensors")))
        else:
            api = HfApi()
            if filename:
                infos = api.get_paths_info(source.repo, [filename])
                sizes = [i.size for i in infos if hasattr(i, "size") and i.path == filename]
                if not sizes:
                    raise FetchFailure(f"the repo has no file {filename}")
                size = int(sizes[0])
            else:
                files = {
                    f.path: int(f.size)
                    for f in api.list_repo_tree(source.repo, recursive=True)
                    if hasattr(f, "size")
                }
                filename = _single(sorted(n for n in files if n.endswith(".safetensors")), files)
                size = files[filename]
            if size > max_bytes:
                raise FetchFailure(
                    f"the file is {human_bytes(size)}, over the {human_bytes(max_bytes)} limit"
                )
        return Path(hf_hub_download(source.repo, filename, local_files_only=offline))
    except FetchFailure:
        raise
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError):
        if offline:
            raise FetchFailure(
                "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so it cannot be downloaded"
            ) from None
        raise FetchFailure("the Hugging Face Hub cannot be reached and the file is not cached") from None
    except errors.GatedRepoError:
        raise FetchFailure("the repo is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise FetchFailure("no such Hugging Face repo (or it is private and HF_TOKEN is not set)") from None
    except errors.RevisionNotFoundError:
        raise FetchFailure("the repo has no such revision") from None
    except errors.EntryNotFoundError:
        raise FetchFailure(f"the repo has no file {source.file}") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise FetchFailure(f"the Hugging Face Hub answered {status}") from None
    except errors.HFValidationError:
        raise FetchFailure("not a valid Hugging Face repo id") from None
    except Exception as exc:  # huggingface_hub raises its own HTTP client's errors (httpx2)
        raise FetchFailure(f"the Hugging Face download failed: {exc}") from None


def _single(names: list[str], files: dict[str, int] | None = None) -> str:
    if len(names) == 1:
        return names[0]
    if not names:
        pickles = [n for n in (files or {}) if is_pickle_name(n)]
        extra = " (it has only pickle files, which are refused)" if pickles else ""
        raise FetchFailure(f"the repo has no .safetensors file{extra}")
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    raise FetchFailure(f"the repo has {len(names)} .safetensors files ({shown}); name one as owner/repo/file")
