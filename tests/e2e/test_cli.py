"""`flux2-server generate` and `download`: one-shot local use of the server's own code."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.testing import linear_shapes, write_lora
from server.oneshot import parse_lora
from server.testing import LiveServer, installed_command


def cli(*args: str, cache_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed command, run from an empty folder as a user would."""
    environment = {**os.environ, "FLUX2_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", **env}
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(
            [installed_command(), *args],
            cwd=folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("owner/repo", {"path": "owner/repo"}),
        ("style.safetensors:0.6", {"path": "style.safetensors", "scale": 0.6}),
        ("https://host/x.safetensors", {"path": "https://host/x.safetensors"}),
        ("https://host:8080/x.safetensors:2", {"path": "https://host:8080/x.safetensors", "scale": 2.0}),
    ],
)
def test_parse_lora(text: str, parsed: dict[str, object]) -> None:
    assert parse_lora(text) == parsed


def test_generate_equals_the_servers_image(tmp_path: Path, cache_dir: Path, live_server: LiveServer) -> None:
    out = tmp_path / "fox.png"
    run = cli("generate", "a red fox", "--size", "528x512", "--steps", "5", "--seed", "3", "-o", str(out),
              "--model", "tiny", cache_dir=cache_dir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert "5/5" in run.stderr  # the progress bar ran to the end
    # Only the command's own lines: no library noise (processor kwargs, torchao imports) on the way.
    ours = ("MODEL: 'tiny'", "model tiny on cpu", "generating:")
    assert [line for line in run.stderr.splitlines() if line.strip() and not line.startswith(ours)] == []
    body = {
        "prompt": "a red fox",
        "image_size": {"width": 528, "height": 512},
        "num_inference_steps": 5,
        "seed": 3,
    }
    served = httpx.post(f"{live_server.url}/fal-ai/flux-2/lora", json=body, timeout=60).json()
    server_pixels = np.asarray(Image.open(io.BytesIO(httpx.get(served["images"][0]["url"]).content)))
    assert np.array_equal(np.asarray(Image.open(out)), server_pixels)


def test_generate_an_edit_with_a_lora_and_several_images(tmp_path: Path, cache_dir: Path) -> None:
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

    from pipeline.tiny import ensure_tiny_pipeline

    shapes = linear_shapes(
        Flux2Transformer2DModel.from_pretrained(ensure_tiny_pipeline(cache_dir / "tiny") / "transformer")
    )
    write_lora(tmp_path / "loras" / "mine.safetensors", shapes, list(shapes)[:4], rank=2, seed=1)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.linspace(0, 255, 300 * 200 * 3).reshape(200, 300, 3).astype(np.uint8)).save(photo)
    options = ["--image", str(photo), "--steps", "4", "--num-images", "2", "-o", str(tmp_path / "x.jpg")]
    lora = ["--lora-folder", str(tmp_path / "loras"), "--lora", "mine.safetensors:0.5"]
    run = cli("generate", "p", "--model", "tiny", *options, *lora, cache_dir=cache_dir)
    assert run.returncode == 0, run.stderr
    outputs = [tmp_path / "x-0.jpg", tmp_path / "x-1.jpg"]
    assert run.stdout.split() == [str(path) for path in outputs]
    for path in outputs:  # an edit: the photo's size (300x200), floored to multiples of 16
        assert Image.open(path).format == "JPEG" and Image.open(path).size == (288, 192)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--steps", "99"), "num_inference_steps: Input should be less than or equal to 50"),
        (("--lora", "/etc/x.ckpt"), "pickle"),
        (("--image", "/no/such/photo.png"), "--image /no/such/photo.png: No such file or directory"),
        (("--image", "/etc/hostname"), "--image image 0: not an image this server can read"),
    ],
)
def test_generate_refuses_bad_input(cache_dir: Path, args: tuple[str, ...], message: str) -> None:
    run = cli("generate", "p", "--model", "tiny", *args, cache_dir=cache_dir)
    assert run.returncode == 2
    assert message in run.stderr


def test_download(cache_dir: Path) -> None:
    tiny = cli("download", "--model", "tiny", cache_dir=cache_dir)
    assert tiny.returncode == 0, tiny.stderr
    assert (Path(tiny.stdout.strip()) / "model_index.json").is_file()
    offline = cli("download", cache_dir=cache_dir, HF_HOME=str(cache_dir / "empty-hf-home"))
    assert offline.returncode == 1
    assert "black-forest-labs/FLUX.2-dev is not cached" in offline.stderr


def _lokr(path: Path, rank: int) -> Path:
    """A SimpleTuner-named LoKr on one attention projection of FLUX.2 [dev]'s first block (3072 wide)."""
    from safetensors.torch import save_file

    torch_ = pytest.importorskip("torch")
    save_file(
        {
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch_.randn(4, 4, dtype=torch_.bfloat16),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_a": torch_.randn(
                768, rank, dtype=torch_.bfloat16
            ),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": torch_.randn(
                rank, 768, dtype=torch_.bfloat16
            ),
            "lycoris_transformer_blocks_0_attn_to_q.alpha": torch_.tensor(float(rank)),
        },
        str(path),
    )
    return path


def test_lora_info_reports_what_the_server_reads(tmp_path: Path, cache_dir: Path) -> None:
    lokr = _lokr(tmp_path / "style-lokr.safetensors", rank=8)
    run = cli("lora-info", str(lokr), cache_dir=cache_dir)
    assert run.returncode == 0, run.stderr
    report = run.stdout
    assert "layout:   diffusers/peft (LyCORIS LoKr, read as LoRA factors)" in report
    assert "rank:     32" in report  # cols(w1) x r = 4 x 8, exactly
    assert "transformer_blocks 0 (1 blocks): attn.to_q" in report
    assert "BF16" in report and "slots:    fits" in report


def test_lora_info_says_why_the_server_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.cli import main

    monkeypatch.setenv("FLUX2_MAX_LORA_RANK", "16")
    assert main(["lora-info", str(_lokr(tmp_path / "style-lokr.safetensors", rank=8))]) == 1
    out = capsys.readouterr().out
    assert "slots:    refused" in out
    assert "needs rank 32 as a LoRA" in out and "FLUX2_LYCORIS_TRUNCATE" in out
