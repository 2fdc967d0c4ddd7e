"""LoRAs from the Hugging Face Hub: `owner/repo` or `owner/repo/sub/file.safetensors`, downloaded by
huggingface_hub into its own cache (`HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE` are honoured, and a cached
repo works offline). Blocking: called from a worker thread.

A repo named without a file gives its LoRA file by diffusers' rule for `load_lora_weights` without a
`weight_name` (`.safetensors` files, none whose path mentions scheduler, optimizer or checkpoint, and
`pytorch_lora_weights.safetensors` when there is one), with top-level files first (what diffusers means
to do: a main file beside a ComfyUI copy in a folder). Where diffusers would take whichever the listing
gives first, the request is refused with the candidates, to be named as `owner/repo/file.safetensors`.
"""

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
                filename = pick_lora_file(sorted(str(f.relative_to(folder)) for f in folder.rglob("*")))
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
                filename = pick_lora_file(sorted(files))
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


_NOT_LORAS = ("scheduler", "optimizer", "checkpoint")  # diffusers' `_best_guess_weight_name` skips these
_DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def pick_lora_file(names: list[str]) -> str:
    """The repo's LoRA file among its file paths (see the module docstring), or a FetchFailure that lists
    the candidates."""
    safetensors = [n for n in names if n.endswith(".safetensors")]
    candidates = [n for n in safetensors if not any(word in n for word in _NOT_LORAS)]
    candidates = [n for n in candidates if "/" not in n] or candidates
    candidates = [n for n in candidates if n.endswith(_DIFFUSERS_NAME)] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        pickles = [n for n in names if is_pickle_name(n)]
        extra = " (it has only pickle files, which are refused)" if pickles and not safetensors else ""
        skipped = f" besides {', '.join(safetensors[:3])}, which are not LoRAs by name" if safetensors else ""
        raise FetchFailure(f"the repo has no .safetensors LoRA file{extra}{skipped}")
    shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
    raise FetchFailure(
        f"the repo has {len(candidates)} .safetensors files that could be the LoRA ({shown}); name one as"
        " owner/repo/file.safetensors"
    )
