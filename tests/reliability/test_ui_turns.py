"""The UI stays responsive while a large request runs (issue 21): another session's small request waits for
at most the one request ahead of it, even when the first user queued several large ones, and its image
equals the same request run alone pixel for pixel.

The served test measures every time it compares in the same run (solo small, solo large, small during
large), so it holds on a slow or busy machine; its margins are stated next to the assertions.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import serve_tiny_ui
from PIL import Image

from loracompose.errors import UserError
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER
from loracompose.ui.app import LoraComposeApp
from loracompose.ui.library import TABLE_HEADERS
from loracompose.ui.turns import BUSY_MESSAGE, PipelineTurns

SMALL_STEPS = 2
LARGE_STEPS = 60  # a deliberately long request: about 5 s on one CPU thread (tiny SD1.5, 64x64)
LARGE_REQUESTS_OF_A = 3  # sent at once by the first user; a plain FIFO would make the second user wait for all
POLL_SECONDS = 0.05


# ------------------------------------------------------------------------------------ PipelineTurns alone


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_turns_run_one_request_at_a_time_in_arrival_order():
    turns = PipelineTurns()
    entered: list[str] = []
    waits: dict[str, list[int]] = {"b": [], "c": []}
    inside = threading.Semaphore(1)  # acquiring it without blocking fails if two requests were inside at once
    release = {name: threading.Event() for name in "abc"}

    def request(session: str) -> None:
        with turns.turn(session, waits.get(session, []).append):
            assert inside.acquire(blocking=False), "two requests held the pipeline at once"
            entered.append(session)
            release[session].wait(10)
            inside.release()

    threads = {name: threading.Thread(target=request, args=(name,)) for name in "abc"}
    for name in "abc":  # one after the other, each once the previous one is in the line
        threads[name].start()
        wait_until(lambda name=name: name in turns.waiting())
    assert turns.waiting() == ["a", "b", "c"] and entered == ["a"]
    release["a"].set()
    wait_until(lambda: entered == ["a", "b"] and waits["c"] == [2, 1])
    release["b"].set()
    release["c"].set()
    for thread in threads.values():
        thread.join(10)
    assert entered == ["a", "b", "c"]
    assert waits == {"b": [1], "c": [2, 1]}, "each waiting request is told how many are ahead of it"
    assert turns.waiting() == []


def test_a_second_request_of_a_busy_session_is_refused_at_once():
    turns = PipelineTurns()
    with turns.turn("a"):
        started = time.monotonic()
        with pytest.raises(UserError) as refused, turns.turn("a"):
            pass
        assert time.monotonic() - started < 1.0, "refused without waiting"
        assert str(refused.value) == BUSY_MESSAGE and "\n" not in BUSY_MESSAGE
        assert turns.waiting() == ["a"], "the refused request takes no place in the line"
    with turns.turn("a"):  # once the first request is done the session may send the next
        assert turns.waiting() == ["a"]


def test_a_failing_request_gives_its_turn_back():
    turns = PipelineTurns()
    with pytest.raises(RuntimeError, match="boom"), turns.turn("a"):
        raise RuntimeError("boom")
    assert turns.waiting() == []
    with turns.turn("b"):
        assert turns.waiting() == ["b"]


# ------------------------------------------------------------------------------------ the served UI


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LoraComposeApp, str]]:
    """The UI on the embedded tiny SD1.5 variant with its demo LoRAs, served on a free port."""
    with serve_tiny_ui() as (app, _, _, url):
        yield app, url


def page_request(app: LoraComposeApp, steps: int, seed: int) -> list[Any]:
    """The page's Generate form (``/generate_form``): Merge of one LoRA at 64x64, every method panel at
    its defaults."""
    table = {"headers": TABLE_HEADERS,
             "data": [[row[1] == "character", *row[1:]] for row in app.initial_table()]}
    panels = [control.component.value for panel in app.forms.panels.values() for control in panel.controls]
    return ["a cat", "", table, seed, steps, 6.0, 64, 64, 1, DEFAULT_SCHEDULER, True, True, "merge", *panels]


def image_of(result: tuple) -> np.ndarray:
    gallery = result[0]
    with Image.open(gallery[0]["image"]) as image:
        return np.asarray(image.convert("RGB"))


def timed(client: Client, request: list[Any]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    result = client.predict(*request, api_name="/generate_form")
    return image_of(result), time.perf_counter() - started


def statuses_until_done(*jobs) -> list[tuple[list[Any], float]]:
    """Poll submitted jobs' statuses until all are done: for each, (every status seen, when it was done)."""
    seen: list[list[Any]] = [[] for _ in jobs]
    done: list[float | None] = [None] * len(jobs)
    while None in done:
        for index, job in enumerate(jobs):
            if done[index] is None:
                if job.done():
                    done[index] = time.perf_counter()
                else:
                    seen[index].append(job.status())
        time.sleep(POLL_SECONDS)
    return list(zip(seen, done))


def test_a_small_request_waits_for_one_large_request_not_for_every_request_queued_before_it(served):
    """Client A sends several large requests at once, then client B a small one: A's extra requests are
    refused at once (one request per session), and B's request finishes within its own time plus the
    one large request's time (plus the stated margin), with the image it gets alone."""
    app, url = served
    client_a, client_b = Client(url, verbose=False), Client(url, verbose=False)
    small, large = page_request(app, SMALL_STEPS, seed=3), page_request(app, LARGE_STEPS, seed=4)

    timed(client_b, small)  # warm-up: first call of the session
    small_image, small_alone = min((timed(client_b, small) for _ in range(2)), key=lambda run: run[1])
    large_image, large_alone = timed(client_a, large)

    submitted = time.perf_counter()
    large_jobs = [client_a.submit(*large, api_name="/generate_form") for _ in range(LARGE_REQUESTS_OF_A)]
    wait_until(lambda: sum(job.done() for job in large_jobs) == LARGE_REQUESTS_OF_A - 1,
               timeout=large_alone * 4 + 30)
    refused_after = time.perf_counter() - submitted
    running = next(job for job in large_jobs if not job.done())
    for job in large_jobs:
        if job is not running:
            with pytest.raises(AppError, match="this session already has a request running or waiting"):
                job.result()
    # Refused at once, not after a turn (half the large request's time is far more than a round trip).
    assert refused_after < large_alone / 2, (refused_after, large_alone)
    wait_until(lambda: any(unit.unit == "steps" and (unit.index or 0) > 0
                           for status in [running.status()] for unit in status.progress_data or []),
               timeout=large_alone * 4 + 30)  # the large request reports its steps (tqdm tracked)

    small_sent = time.perf_counter()
    small_job = client_b.submit(*small, api_name="/generate_form")
    (large_seen, large_done), (small_seen, small_done) = statuses_until_done(running, small_job)
    small_during, after_large = small_done - small_sent, small_done - large_done
    print(f"solo small {small_alone:.2f} s, solo large {large_alone:.2f} s ({LARGE_STEPS} steps), small sent "
          f"during large {small_during:.2f} s, of which {after_large:.2f} s after the large one finished")

    assert np.array_equal(image_of(small_job.result()), small_image), "B's image differs from B's image alone"
    assert np.array_equal(image_of(running.result()), large_image), "A's image differs from A's image alone"
    steps = [unit for status in large_seen for unit in status.progress_data or [] if unit.unit == "steps"]
    assert steps and max(unit.index for unit in steps) > 0 and {unit.length for unit in steps} == {LARGE_STEPS}
    waiting = {unit.desc for status in small_seen for unit in status.progress_data or []}
    assert "waiting for the model: 1 request(s) ahead" in waiting, waiting

    # The sharp check, measured in this phase so that it holds however the shared machine's speed changed
    # since the solo runs: once the one large request ahead is done, B's request runs next and takes about
    # its own time. Margin: half its own time again plus up to 3 s (hand-over, round trips, polling), capped
    # at half a large request, so that waiting for a second large request (one more large request's time)
    # fails it.
    assert after_large <= 1.5 * small_alone + min(3.0, 0.5 * large_alone), (after_large, small_alone, large_alone)
    # The acceptance line in solo times: its own time plus one queue slot (the large request). Margin: the
    # solo times once more plus 2 s, as the solo runs were measured earlier on a machine other jobs share
    # (on the 2-core CI machine the same request varied up to 3x between runs); the check above is the
    # sharp one.
    margin = small_alone + large_alone + 2.0
    assert small_during <= small_alone + large_alone + margin, (small_during, small_alone, large_alone)
