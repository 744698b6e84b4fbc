"""The served descriptions: the Workers AI schema route, /openapi.json (OpenAPI 3.1) and /docs (Swagger UI in
headless Chromium), all equal to or built from llama32.schema()."""

from __future__ import annotations

import httpx
import pytest

import llama32

pytest.importorskip("starlette")
from llama32.server import create_app  # noqa: E402
from llama32.server.docs import PLAYGROUND_FIELDS  # noqa: E402

from test_server import running  # noqa: E402  (a real uvicorn server on a free loopback port)

MODEL = "@cf/meta/llama-3.2-1b-instruct"
SCHEMA = f"/client/v4/accounts/abc123/ai/models/schema?model={MODEL}"
KEY = "sekret"


@pytest.fixture(scope="module")
def app(make_checkpoint, llama3_tokenizer_dir):
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")
    return create_app(llm, model_name="tiny", api_key=KEY)


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_schema_route_serves_llama32_schema_in_the_envelope(client):
    r = client.get(SCHEMA)
    assert r.status_code == 200
    assert r.json() == {"result": llama32.schema(), "success": True, "errors": [], "messages": []}


def test_schema_route_errors(client, url):
    r = client.get("/client/v4/accounts/abc123/ai/models/schema?model=@cf/meta/llama-3.1-8b-instruct")
    assert r.status_code == 404 and r.json()["success"] is False and "no such model" in r.json()["errors"][0]["message"]
    r = client.get("/client/v4/accounts/abc123/ai/models/schema")
    assert r.status_code == 400 and "model" in r.json()["errors"][0]["message"]
    assert httpx.get(url + SCHEMA).status_code == 401  # an API route: the key is needed


def test_openapi_is_valid_3_1_and_built_from_the_schema(url):
    from openapi_spec_validator import validate
    from openapi_spec_validator.versions import consts  # noqa: F401  (the validator is for 3.1 documents too)

    doc = httpx.get(url + "/openapi.json").json()  # no key needed: it describes, it holds nothing
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    s = llama32.schema()
    assert doc["components"]["schemas"]["WorkersAIInput"] == s["input"]
    assert doc["components"]["schemas"]["WorkersAIResult"] == s["output"]["oneOf"][0]
    assert doc["components"]["schemas"]["StreamChunk"] == s["output"]["$defs"]["chunk"]
    for path in (f"/ai/run/{MODEL}", f"/client/v4/accounts/{{account_id}}/ai/run/{MODEL}",
                 "/client/v4/accounts/{account_id}/ai/models/schema", "/v1/chat/completions", "/v1/completions",
                 "/v1/models"):
        assert path in doc["paths"], path
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["temperature"] == s["input"]["oneOf"][0]["properties"]["temperature"]  # one definition
    # the examples the document gives are requests the schema takes
    import jsonschema
    body = doc["paths"][f"/ai/run/{MODEL}"]["post"]["requestBody"]["content"]["application/json"]
    for example in body["examples"].values():
        jsonschema.Draft202012Validator(s["input"]).validate(example["value"])


def test_openapi_describes_every_route_the_server_has(app, client):
    """A route added to the server without a description here fails this test."""
    doc = client.get("/openapi.json").json()
    pages = {"/", "/favicon.ico", "/openapi.json", "/docs", "/docs/{name}"}  # for browsers, not API calls
    for route in app.routes:
        path = route.path.replace(":path}", "}").replace("/run/{model}", f"/run/{MODEL}")
        if path in pages:
            continue
        assert path in doc["paths"], path
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"][path], (method, path)


def test_openapi_example_runs(client):
    doc = client.get("/openapi.json").json()
    body = doc["paths"][f"/ai/run/{MODEL}"]["post"]["requestBody"]["content"]["application/json"]
    r = client.post(f"/ai/run/{MODEL}", json=body["examples"]["prompt"]["value"])
    assert r.status_code == 200
    import jsonschema
    jsonschema.Draft202012Validator(doc["components"]["schemas"]["WorkersAIResult"]).validate(r.json()["result"])


def test_docs_assets_are_served_locally(url, client):
    page = httpx.get(url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text and "http" not in page.text.split("<body>")[1]
    js = httpx.get(url + "/docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert httpx.get(url + "/docs/swagger-ui.css").status_code == 200
    assert client.get("/docs/index.html").status_code == 404  # only the two files the page needs
    assert httpx.get(url + "/docs/index.html").status_code == 401  # and nothing else is open


def test_playground_controls_come_from_the_schema(url, browser):
    from selenium.webdriver.common.by import By

    fields = llama32.schema()["input"]["oneOf"][1]["properties"]
    browser.get(url + "/")
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#knobs input')].map(i => [i.id, i.min, i.max, i.value, i.step])")
    assert [s[0] for s in shown] == list(PLAYGROUND_FIELDS)
    for name, lo, hi, value, step in shown:
        d = fields[name]
        assert float(lo) == d["minimum"] and (hi == "" if "maximum" not in d else float(hi) == d["maximum"])
        assert value == ("" if "default" not in d else str(d["default"])), name
        assert step == ("1" if d["type"] == "integer" else "any"), name
    # a value outside the schema's range is refused by the page itself: nothing is sent
    box = browser.find_element(By.ID, "top_k")
    box.clear()
    box.send_keys("99")
    browser.find_element(By.ID, "message").send_keys("Hi")
    browser.find_element(By.ID, "send").click()
    assert browser.execute_script("return document.getElementById('top_k').validity.rangeOverflow") is True
    assert browser.find_elements(By.CSS_SELECTOR, ".user") == [] and browser.find_element(By.ID, "status").text == ""


def test_docs_render_and_run_a_request_in_chromium(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(url + "/docs")
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 6)
    text = driver.find_element(By.ID, "swagger-ui").text
    assert "/v1/chat/completions" in text and f"/ai/run/{MODEL}" in text
    errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".errors-wrapper")]
    assert not errors, errors  # Swagger UI found nothing wrong in the document
    # the schema route, tried out from the page (with the key typed into Authorize)
    driver.find_element(By.CSS_SELECTOR, ".authorize").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".auth-container input"))
    driver.find_element(By.CSS_SELECTOR, ".auth-container input").send_keys(KEY)
    driver.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
    driver.find_element(By.CSS_SELECTOR, ".btn-done").click()
    op = driver.find_element(By.ID, "operations-Workers_AI-model_schema")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, "input[placeholder='account_id']"))
    op.find_element(By.CSS_SELECTOR, "input[placeholder='account_id']").send_keys("abc123")
    op.find_element(By.CSS_SELECTOR, ".execute").click()
    cell = ".live-responses-table tr.response .response-col_status"
    wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, cell))
    assert op.find_element(By.CSS_SELECTOR, cell).text.strip() == "200"
    shown = op.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description").text
    assert '"success": true' in shown and '"x-extension": true' in shown
