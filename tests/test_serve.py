"""`jaxchar serve`: the batching engine against Run.generate, the HTTP API in-process, a
real server on loopback (a client that leaves mid-stream), and the page in a real browser."""

import json
import shutil
import socket
import threading
import time
import urllib.request
from functools import partial

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from jaxchar.config import SampleConfig  # noqa: E402
from jaxchar.engine import Engine, Request  # noqa: E402
from jaxchar.run import Run  # noqa: E402
from jaxchar.serve import MAX_BODY, Server, make_app  # noqa: E402

PROMPTS = ["alice was", "the queen", "x", "down the rabbit hole and", "off with her head!"]
SETTINGS = [(0.8, 0, 1.0), (0.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.9), (1.2, 3, 0.8)]


def _collect(engine, run, jobs, length=40):
    """Submits every (prompt, seed, temperature, top_k, top_p) at once; returns the texts."""
    done, texts = [], []
    for prompt, seed, t, k, p in jobs:
        got, ev = [], threading.Event()

        def emit(ids, got=got, ev=ev):
            if ids is None:
                ev.set()
            else:
                got.extend(ids)

        opts = SampleConfig(length=length, temperature=t, top_k=k, top_p=p)
        engine.submit(Request(run.encode_prompt(prompt), opts, seed, emit))
        done.append(ev)
        texts.append(got)
    for ev in done:
        assert ev.wait(120)
    return [run.vocab.decode(ids) for ids in texts]


# stateful generation on the default config's shapes and on tiny's (the whole suite only:
# the same code as fast's), window generation on the tutorial's
@pytest.mark.parametrize(
    "which", [pytest.param("tiny_run", marks=pytest.mark.slow), "fast_run", "window_run"]
)
def test_batched_rows_get_what_each_request_gets_alone(which, request):
    """Eight requests at once, as rows of one call, against the same requests one at a time
    and against Run.generate: the same text for the same seed and settings (stateful
    generation for the tiny run, the tutorial's windows for the window-trained one)."""
    run = Run.open(request.getfixturevalue(which))
    params, _ = run.params()
    mode = run.options().mode
    jobs = [(p, 7 + i, *s) for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS, strict=True))]
    jobs += [("alice", 100 + i, 0.9, 0, 1.0) for i in range(3)]
    texts = {}
    for slots in (8, 1):
        engine = Engine(
            params,
            run.cfg.model,
            mode=mode,
            seq_length=run.cfg.data.seq_length,
            slots=slots,
            chunk=8,
            gather_ms=20,
        )
        engine.start()
        try:
            texts[slots] = _collect(engine, run, jobs)
            calls = engine.calls
        finally:
            engine.stop()
        if slots == 8:  # all rows advanced together: one request's number of calls
            assert calls == 40 // 8, calls
        else:
            assert calls == len(jobs) * 40 // 8
    assert texts[8] == texts[1]
    for (prompt, seed, t, k, p), text in zip(jobs, texts[8], strict=True):
        want = run.generate(prompt, seed=seed, length=40, temperature=t, top_k=k or None, top_p=p)
        assert text == want[0]


def test_a_cancelled_request_frees_its_row_and_the_others_go_on(tiny_run):
    run = Run.open(tiny_run)
    params, _ = run.params()
    engine = Engine(params, run.cfg.model, slots=2, chunk=4, gather_ms=0).start()
    try:
        first = threading.Event()
        opts = SampleConfig(length=2000, temperature=0.8)
        leaver = Request(run.encode_prompt("alice"), opts, 1, lambda ids: first.set())
        engine.submit(leaver)
        assert first.wait(60)
        leaver.cancel()
        (text,) = _collect(engine, run, [("the", 3, 0.8, 0, 1.0)])
        assert len(text) == 40
        deadline = time.time() + 30
        while engine.busy_rows() and time.time() < deadline:
            time.sleep(0.01)
        assert engine.busy_rows() == 0 and leaver.made < 2000
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def client(tiny_run):
    server = Server(tiny_run, slots=8, chunk=8, max_length=500)
    with TestClient(make_app(server)) as c:
        c.server = server
        yield c


def test_generate_as_json_and_as_a_stream(client, tiny_run):
    body = {"prompt": "alice was", "length": 50, "temperature": 0.7, "seed": 11}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    want = Run.open(tiny_run).generate("alice was", seed=11, length=50, temperature=0.7)[0]
    assert answer["text"] == want and answer["seed"] == 11 and answer["step"] > 0
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        blocks = "".join(r.iter_text()).strip().split("\n\n")
    pieces = [json.loads(b[len("data: ") :])["text"] for b in blocks if b.startswith("data: ")]
    assert len(pieces) > 1 and "".join(pieces) == want  # several pieces, as they were made
    assert (
        blocks[-1].startswith("event: done")
        and json.loads(blocks[-1].split("data: ")[1])["text"] == want
    )


def test_defaults_come_from_the_run_and_the_seed_is_reported(client):
    r = client.post("/v1/generate", json={"length": 20})
    assert r.status_code == 200
    answer = r.json()
    again = client.post("/v1/generate", json={"length": 20, "seed": answer["seed"]}).json()
    assert again["text"] == answer["text"] and again["prompt"] == answer["prompt"]


def test_beam_search_over_http(client, tiny_run):
    r = client.post("/v1/generate", json={"prompt": "alice", "length": 15, "beam": 3})
    assert r.status_code == 200, r.text
    beams = r.json()["beams"]
    want = Run.open(tiny_run).beam("alice", beam=3, length=15, results=3)
    assert [(b["text"], round(b["log_prob"], 4)) for b in beams] == [
        (t, round(lp, 4)) for t, lp in want
    ]


def test_model_health_metrics_and_page(client):
    info = client.get("/v1/model").json()
    assert info["vocab_size"] == len(info["vocab"]) and info["step"] > 0
    assert "train_loss" in info["losses"] and info["config"]["model"]["hidden"] == 32
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/v1/metrics").json()
    assert metrics["metrics"][-1]["step"] == info["step"] and metrics["samples"]
    page = client.get("/")
    assert page.status_code == 200 and "/v1/generate" in page.text


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"prompt": "a", "colour": "red"}', 400, "unknown field"),
        (b'{"length": "long"}', 400, "length must be int"),
        (b'{"stream": 1}', 400, "stream must be bool"),
        (b'{"length": 0}', 422, "length"),
        (b'{"length": 100000}', 422, "length"),
        (b'{"temperature": -1}', 422, "temperature"),
        (b'{"top_p": 0}', 422, "top_p"),
        (b'{"top_k": 1000}', 422, "top_k"),
        (b'{"beam": 0}', 422, "beam"),
        (b'{"stop": "."}', 422, "beam"),
        (b'{"prompt": "\\u2603\\u2603"}', 422, 'send "unknown": "skip"'),
        (b'{"prompt": "a", "unknown": "drop"}', 422, "unknown must be"),
        (b'{"prompt": "' + b"a" * 5000 + b'"}', 413, "--max-prompt"),
        (b'{"seed": -1}', 422, "seed must be an integer from 0 to 2**63 - 1"),
        (b'{"prompt": ""}', 422, "empty"),
        (b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}', 413, "over"),
    ],
)
def test_bad_requests_get_one_line_json_errors(client, body, status, words):
    r = client.post("/v1/generate", content=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error
    assert client.get("/health").json() == {"status": "ok", "busy_rows": 0}


def test_the_training_samples_are_served_as_text_to_read():
    from jaxchar.serve import readable_samples

    log = (
        "--- step 5 (epoch 1) ---\n"
        "[temperature 0.2] 'alice\\nwas \"here\"'\n"
        "[temperature 1.0] 'x'\n"
    )
    assert readable_samples(log) == (
        '--- step 5 (epoch 1) ---\n[temperature 0.2]\nalice\nwas "here"\n\n[temperature 1.0]\nx\n\n'
    )
    assert readable_samples("[temperature 0.5] 'cut off") == "[temperature 0.5] 'cut off\n"


def test_unknown_characters_are_skipped_when_the_request_asks(client):
    r = client.post("/v1/generate", json={"prompt": "alice \u2603", "unknown": "skip", "length": 5})
    assert r.status_code == 200, r.text
    assert "--unknown" not in client.post("/v1/generate", json={"prompt": "\u2603"}).text


def test_unknown_routes_and_methods(client):
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/v1/generate").status_code == 405
    assert "error" in client.get("/v2/nothing").json()


# --- a real server on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    """uvicorn on a free loopback port, in a thread, over a copy of the tiny run."""
    import uvicorn

    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(tiny_run, run)
    server = Server(run, slots=8, chunk=4, max_length=2000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(server), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    assert web.started
    yield f"http://127.0.0.1:{port}", server, run
    web.should_exit = True
    thread.join(timeout=30)


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_row(live):
    url, server, _ = live
    body = json.dumps({"prompt": "alice", "length": 2000, "stream": True}).encode()
    req = urllib.request.Request(f"{url}/v1/generate", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.readline().startswith(b"data: ")
        assert server.engine.busy_rows() == 1
    # the connection is closed: the server notices at its next write and frees the row
    deadline = time.time() + 30
    while server.engine.busy_rows() and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.busy_rows() == 0
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    return webdriver.Chrome(options=options, service=service)


@pytest.mark.slow
def test_the_page_in_a_real_browser(live):
    """Headless Chromium loads the page, which shows the model and the loss curve; a
    prompt typed and submitted gets generated text, streamed into the page; the training
    samples written later appear on the next refresh."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, run = live
    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "checkpoint step" in b.find_element(By.ID, "model").text)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#curve polyline"))
        browser.find_element(By.ID, "prompt").send_keys("alice was")
        length = browser.find_element(By.ID, "length")
        length.clear()
        length.send_keys("120")
        seed = browser.find_element(By.ID, "seed")
        seed.send_keys("5")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_element(By.ID, "output").get_attribute("data-done") == "1")
        shown = browser.find_element(By.ID, "output").text
        want = Run.open(run).generate("alice was", seed=5, length=120, temperature=0.8)[0]
        # the browser shows text as rendered (white space folded at the ends)
        assert shown.strip() and shown.strip() == want.strip()
        # a training run that writes a new sample: the page shows it on its next refresh
        with open(run / "samples.txt", "a", encoding="utf-8") as f:
            f.write("--- step 999 ---\na sample written while the page is open\n")
            f.write("[temperature 0.5] 'two lines:\\nthe second'\n")
        WebDriverWait(browser, 20).until(
            lambda b: "written while the page" in b.find_element(By.ID, "samples").text
        )
        # the samples read as text: line breaks, not quoted strings with a literal \n
        shown = browser.find_element(By.ID, "samples").text
        assert "two lines:\nthe second" in shown and "\\n" not in shown
        # the chart: the legend's marks have the lines' colours, and the axes have ticks
        style = "return getComputedStyle(document.querySelector(arguments[0]))[arguments[1]]"
        marks = [browser.execute_script(style, f".legend .{c}", "color") for c in ("train", "val")]
        lines = [browser.execute_script(style, f"polyline.{c}", "stroke") for c in ("train", "val")]
        assert marks == lines and marks[0] != marks[1], (marks, lines)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#curve .x-tick")) >= 3
        assert len(browser.find_elements(By.CSS_SELECTOR, "#curve .y-tick")) >= 3
        assert "step" in browser.find_element(By.ID, "curve").text
        assert not browser.find_element(By.ID, "error").text
    finally:
        browser.quit()


def test_serve_without_the_extra_says_what_to_install(monkeypatch, tiny_run, capsys):
    import builtins

    from jaxchar.cli import main

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("no uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    assert main(["serve", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert "jaxchar[serve]" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["--slots", "0"], "--slots"),
        (["--chunk", "0"], "--chunk"),
        (["--prompt-chunk", "48"], "--prompt-chunk"),
        (["--step", "123456"], "123456"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(tiny_run, capsys, args, words):
    from jaxchar.cli import main

    assert main(["serve", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from jaxchar.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("which", ["tiny_run", "window_run"])
def test_a_long_prompt_is_read_a_piece_a_step_between_the_other_rows_steps(which, request):
    """A 1,000-character prompt is read 64 characters a call while a short request runs
    beside it and finishes first; the long request still gets Run.generate's text, and a
    client that leaves while its prompt is read frees its row at the next step."""
    run = Run.open(request.getfixturevalue(which))
    params, _ = run.params()
    engine = Engine(
        params,
        run.cfg.model,
        mode=run.options().mode,
        seq_length=run.cfg.data.seq_length,
        slots=4,
        chunk=8,
        gather_ms=0,
        prompt_chunk=64,
    )
    text = (run.vocab.decode(list(range(run.cfg.model.vocab_size))) * 40)[:1000]
    got: dict[str, list] = {"long": [], "short": []}
    finished: list[str] = []

    def emit(name, ids):
        if ids is None:
            finished.append(name)
        else:
            got[name].extend(ids)

    opts = SampleConfig(length=16, temperature=0.8)
    long = Request(run.encode_prompt(text), opts, 5, partial(emit, "long"))
    leaver = Request(run.encode_prompt(text), opts, 6, lambda ids: None)
    engine.submit(long)
    engine.submit(leaver)
    short = SampleConfig(length=40, temperature=0.8)
    engine.submit(Request(run.encode_prompt("alice"), short, 7, partial(emit, "short")))
    engine._step()
    assert engine.busy_rows() == 3
    leaver.cancel()
    engine._step()
    assert engine.busy_rows() == 2  # the leaver's row is free while its prompt was read
    steps = 2
    while len(finished) < 2:
        engine._step()
        steps += 1
    assert engine.widest == 64  # no call read more of a prompt than its prompt_chunk
    if run.options().mode == "stateful":  # a piece a step: it reads all 1,000 characters
        assert finished[0] == "short" and steps >= 1000 // 64
    else:  # a window reads only the prompt's last seq_length characters
        assert len(long.prompt) == run.cfg.data.seq_length
    want = run.generate(text, seed=5, length=16, temperature=0.8)[0]
    assert run.vocab.decode(got["long"]) == want
    assert engine.busy_rows() == 0


def test_the_cli_default_prompt_chunk_is_the_engines():
    from jaxchar.cli.serve import PROMPT_CHUNK
    from jaxchar.engine import PROMPT_CHUNK as ENGINE_DEFAULT

    assert PROMPT_CHUNK == ENGINE_DEFAULT


def test_after_warm_up_long_and_short_prompts_compile_nothing_new(tiny_run):
    from jaxchar import engine as engine_module

    run = Run.open(tiny_run)
    params, _ = run.params()
    engine = Engine(params, run.cfg.model, slots=2, chunk=4, gather_ms=0, prompt_chunk=32)
    engine.warm_up(lengths=(12,))
    jitted = (engine_module._read, engine_module._advance, engine_module._admit)
    sizes = [f._cache_size() for f in jitted]
    finished = []
    opts = SampleConfig(length=12, temperature=0.8)
    for prompt in ("alice " * 20, "the"):  # 120 characters: pieces of 24 and 32; then 3
        req = Request(run.encode_prompt(prompt), opts, 1, lambda ids: ids or finished.append(1))
        engine.submit(req)
    while len(finished) < 2:
        engine._step()
    assert [f._cache_size() for f in jitted] == sizes
