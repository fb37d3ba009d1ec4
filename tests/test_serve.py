"""`ptft serve`: the predictions and embeddings it answers are `ptft predict`'s and `ptft
embed`'s, in each request's order, whether requests are gathered into one model call or run
alone; bad requests get one-line JSON errors and the server goes on; the token, body size and
in-flight limits hold; over real HTTP, a SIGTERM drains what is in flight and exits cleanly."""
import base64
import io
import json
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from tests.helpers import resnet_run
from tests.test_main_job import ENV, _command, _ptft

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from ptft_jax.infer.predict import predict_images, predict_run  # noqa: E402
from ptft_jax.infer.server import Limits, create_app  # noqa: E402
from ptft_jax.infer.serving import TextClassifier, TextEncoder, load_served  # noqa: E402

TEXTS = ["the lord said unto the king", "and he was a man", "in the house of god and of the "
         "land that he gave unto them for ever", "lord", "unto the king of the land he said",
         "a man", "the house", "and the lord was with him in all that he did", "god",
         "he shall be", "for ever and ever", "the king said"]


@pytest.fixture(scope="module")
def run(lora_run):
    return lora_run


@pytest.fixture(scope="module")
def model(run):
    # Rows of 20 or 40 tokens; 8 or 16 rows (the 8 fake devices split each batch).
    return TextClassifier(run, max_examples=8, max_batch_tokens=640)


@pytest.fixture(scope="module")
def expected(run):
    return list(predict_run(run, TEXTS, progress=False))


def _requests(texts, per):
    return [{"texts": texts[i:i + per]} for i in range(0, len(texts), per)]


def _post_all(client, bodies, path="/v1/predict"):
    """Every body posted at once, from its own thread; the responses in the bodies' order."""
    out = [None] * len(bodies)

    def post(i):
        out[i] = client.post(path, json=bodies[i])
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _check_same(answers, expected):
    assert [a.get("label") for a in answers] == [e["label"] for e in expected]
    np.testing.assert_allclose([list(a["probabilities"].values()) for a in answers],
                               [list(e["probabilities"].values()) for e in expected], atol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False])
def test_served_predictions_are_ptft_predicts_in_order(model, expected, dynamic):
    """Six requests at once: gathered into fewer model calls (or run one by one), each answered
    with its own texts' predictions, as `ptft predict` gives them."""
    model.warm_up()
    with TestClient(create_app(model, Limits(max_wait_s=1.0, dynamic=dynamic))) as client:
        responses = _post_all(client, _requests(TEXTS, 2))
        assert [r.status_code for r in responses] == [200] * 6, responses[0].text
        _check_same([p for r in responses for p in r.json()["predictions"]], expected)
        calls = client.get("/v1/health").json()["model_calls"]
    assert (calls < 6) if dynamic else (calls == 6)
    assert model.calls == calls


def test_texts_run_in_the_shortest_rows_that_hold_them(model, expected):
    """Short texts in rows of 20 tokens, a long one in rows of data.seq_len (40), and every
    answer the same as ptft predict's rows of 40."""
    assert model.lengths == [20, 40] and model.sizes == [8, 16]
    short = model.packed(model.prepare({"texts": TEXTS[3:4]}).inputs["texts"], None)
    long = model.packed(model.prepare({"texts": [" ".join(TEXTS * 3)]}).inputs["texts"], None)
    assert short.seq_len == 20 and long.seq_len == 40
    with TestClient(create_app(model, Limits())) as client:
        for texts in (TEXTS[3:4], TEXTS[:8], [" ".join(TEXTS * 3)]):
            response = client.post("/v1/predict", json={"texts": texts})
            assert response.status_code == 200
            want = list(predict_run(model.run_dir, texts, progress=False))
            _check_same(response.json()["predictions"], want)


BAD = [  # (body or raw bytes, status, what the error says)
    (b"{not json", 422, "not valid JSON"),
    (b'["a list"]', 422, "not a JSON object"),
    ({"texts": "one text"}, 422, "texts: Input should be a valid list"),
    ({"texts": ["fine", 3]}, 422, "texts[1]: Input should be a valid string"),
    ({"text": ["a"]}, 422, "'text' is not a field"),
    ({}, 422, "no 'texts'"),
    ({"texts": []}, 422, "empty list"),
    ({"texts": ["fine", "  "]}, 422, "texts[1] is empty"),
    ({"texts": ["a"] * 9}, 413, "9 texts in one request, over the server's limit of 8"),
    ({"texts": ["a"], "text_pairs": ["b"]}, 422, "'text_pairs' is not read by this server"),
    ({"images": ["aGVsbG8="]}, 422, "'images' is not read by this server"),
]


def test_bad_requests_get_one_line_errors_and_the_server_goes_on(model, expected):
    with TestClient(create_app(model, Limits())) as client:
        for body, status, says in BAD:
            response = client.post("/v1/predict", content=body, headers={
                "Content-Type": "application/json"}) if isinstance(body, bytes) \
                else client.post("/v1/predict", json=body)
            assert response.status_code == status, (body, response.text)
            assert says in response.json()["error"] and "\n" not in response.json()["error"]
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404 and "/v1/predict" in missing.json()["error"]
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 404
        good = client.post("/v1/predict", json={"texts": TEXTS[:2]})
    assert good.status_code == 200
    _check_same(good.json()["predictions"], expected[:2])


def test_the_token_and_the_body_limit_are_checked_first(model):
    app = create_app(model, Limits(token="s3cret", max_body_bytes=300))
    body = {"texts": TEXTS[:2]}
    with TestClient(app) as client:
        assert client.get("/v1/health").status_code == 200  # open: load balancers probe it
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/v1/predict", json=body, headers=headers)
            assert response.status_code == 401 and "Bearer" in response.json()["error"]
        assert client.get("/v1/model").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/predict", json=body, headers=auth).status_code == 200
        big = json.dumps({"texts": ["word " * 80]}).encode()
        assert client.post("/v1/predict", content=big, headers=auth).status_code == 413
        # Without a Content-Length (chunked): counted as it arrives.
        chunked = client.post("/v1/predict", content=iter([big[:200], big[200:]]),
                              headers=auth)
        assert chunked.status_code == 413 and "--max-body-bytes" in chunked.json()["error"]


def test_the_model_route_names_the_checkpoint_and_the_docs_list_the_routes(model, run):
    with TestClient(create_app(model, Limits())) as client:
        info = client.get("/v1/model").json()
        docs = client.get("/docs")
        paths = client.get("/openapi.json").json()["paths"]
    assert info["labels"] == json.loads((run / "labels.json").read_text())["names"]
    assert info["task"] == "classification" and info["step"] == 3
    assert info["checkpoint"].endswith("(step 3)") and info["params_checksum"].startswith(
        "sha256:")
    assert info["batch_sizes"] == model.sizes and info["row_lengths"] == [20, 40]
    assert docs.status_code == 200 and {"/v1/predict", "/v1/embed", "/v1/health",
                                        "/v1/model"} <= set(paths)
    # The same weights give the same checksum; other weights another.
    assert TextClassifier(run, 8, 64).checksum == info["params_checksum"]


def test_an_encoder_serves_ptft_embeds_embeddings(pretrained):
    from ptft_jax.infer.embed import embed, load_encoder
    encoder = load_served(str(pretrained), 16, 256, 0, seq_len=32)
    assert isinstance(encoder, TextEncoder)
    encoder.warm_up()
    # Short texts run in rows of 16 tokens, a long one in rows of --seq-len; the same vectors.
    assert encoder.lengths == [16, 32]
    ids = encoder.prepare({"texts": TEXTS[:2]}).inputs
    assert encoder.packed(ids).seq_len == 16
    long = [" ".join(TEXTS * 3)]
    assert encoder.packed(encoder.prepare({"texts": long}).inputs).seq_len == 32
    with TestClient(create_app(encoder, Limits(max_wait_s=0.5))) as client:
        responses = _post_all(client, _requests(TEXTS, 3), "/v1/embed")
        one_long = client.post("/v1/embed", json={"texts": long})
        info = client.get("/v1/model").json()
        wrong = client.post("/v1/predict", json={"texts": ["a"]})
    assert [r.status_code for r in responses] == [200] * 4
    got = np.array([v for r in responses for v in r.json()["embeddings"]] +
                   one_long.json()["embeddings"])
    want = embed(load_encoder(str(pretrained)), TEXTS + long, seq_len=32, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert info["endpoint"] == "/v1/embed" and info["dimensions"] == got.shape[1]
    assert info["row_lengths"] == [16, 32]
    assert wrong.status_code == 404 and "/v1/embed" in wrong.json()["error"]


def test_an_image_run_serves_base64_images(tmp_path):
    from PIL import Image
    run, images = resnet_run(tmp_path)
    files, encoded = [], []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i], "L").save(files[-1])
        encoded.append(base64.b64encode(files[-1].read_bytes()).decode())
    served = load_served(str(run), 8, 0, 16)
    served.warm_up()
    with TestClient(create_app(served, Limits())) as client:
        response = client.post("/v1/predict", json={"images": encoded})
        not_base64 = client.post("/v1/predict", json={"images": [encoded[0], "%%%"]})
        buffer = io.BytesIO(b"GIF89a not really")
        not_image = client.post("/v1/predict", json={
            "images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert response.status_code == 200, response.text
    want = list(predict_images(run, files, progress=False))
    _check_same(response.json()["predictions"], want)
    assert not_base64.status_code == 422 and "images[1] is not base64" in \
        not_base64.json()["error"]
    assert not_image.status_code == 422 and "images[0] does not decode" in \
        not_image.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_in_use_is_refused_before_the_model_loads(run):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = _ptft("serve", str(run), "--port", str(held.getsockname()[1]), timeout=120)
    assert result.returncode == 2
    assert "cannot be bound" in result.stderr and "--port" in result.stderr


@pytest.mark.slow
def test_over_http_past_the_limit_is_429_and_sigterm_drains(run):
    """A real server: a request waits in its batch (--max-wait-ms) while a second is refused
    with 429 (--max-concurrent 1); a SIGTERM then still answers the first, and exits 0."""
    port = _free_port()
    server = subprocess.Popen([*_command(), "serve", str(run), "--port", str(port),
                               "--max-wait-ms", "4000", "--max-concurrent", "1"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.5)
        first: dict = {}
        waiting = threading.Thread(target=lambda: first.update(response=httpx.post(
            url + "/v1/predict", json={"texts": TEXTS[:3]}, timeout=60)))
        waiting.start()
        while httpx.get(url + "/v1/health", timeout=2).json()["in_flight"] == 0:
            time.sleep(0.05)
        second = httpx.post(url + "/v1/predict", json={"texts": ["a"]}, timeout=10)
        assert second.status_code == 429 and "--max-concurrent" in second.json()["error"]
        server.send_signal(signal.SIGTERM)
        waiting.join(60)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert first["response"].status_code == 200
    assert len(first["response"].json()["predictions"]) == 3
    assert server.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM after answering the requests in flight" in stderr
