"""`/metrics` in Prometheus' text format, counting what happened."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import Harness

BODY = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}


def samples(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = h.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_requests_by_outcome_and_timings(harness: Harness) -> None:
    assert harness.client.post("/fal-ai/flux-2/lora", json=BODY).status_code == 200
    assert harness.client.post("/fal-ai/flux-2/lora", json={**BODY, "num_images": 9}).status_code == 422
    assert (
        harness.client.post("/fal-ai/flux-2/lora", json={**BODY, "acceleration": "high"}).status_code == 200
    )
    s = samples(harness)
    assert s[("flux2_requests_total", (("outcome", "ok"),))] == 2
    assert s[("flux2_requests_total", (("outcome", "validation_error"),))] == 1
    for preset in ("regular", "high"):  # timings by preset, to see what each costs
        assert s[("flux2_inference_seconds_count", (("acceleration", preset),))] == 1
        assert s[("flux2_step_seconds_sum", (("acceleration", preset),))] == 0.01 / 4
    assert ("flux2_step_seconds_count", (("acceleration", "none"),)) not in s
    assert s[("flux2_queue_wait_seconds_count", ())] == 2
    assert s[("flux2_lora_switch_seconds_count", ())] == 2
    assert s[("flux2_lora_cache_misses_total", (("cache", "memory"),))] == 2  # as the worker reported
    assert ("flux2_lora_cache_hits_total", (("cache", "disk"),)) in s
    assert ("flux2_device_memory_bytes", ()) in s and ("flux2_compiled_graphs_total", ()) in s


def test_queue_depth(held: Harness) -> None:
    for _ in range(3):
        held.client.post("/queue/fal-ai/flux-2/lora", json=BODY)
    assert samples(held)[("flux2_queue_depth", ())] == 2  # one runs, two wait
