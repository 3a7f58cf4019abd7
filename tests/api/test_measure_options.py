"""POST /measure options (``num_classes``, ``center``, ``global_mean``, ``remap_labels``) are taken the same way
by both body forms: in the ``options`` object/part or as top-level JSON keys / single form fields (these win);
an option in the query string is refused (it used to be silently ignored); the "pass remap_labels=True" advice
of ncengine says how to send it over HTTP."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from api.schemas.measure import OPTION_FIELDS, MeasureMultipartForm, MeasureRequest
from ncengine.metrics import measure
from tests.api.conftest import assert_problem
from tests.api.routers.test_measure import assert_same


def _data(seed=0, C=3, n_per=10, d=4):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per)
    H = rng.normal(size=(C, d))[y] + 0.3 * rng.normal(size=(len(y), d))
    return H, y


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _files(H, y) -> dict:
    return {"features": ("features.npy", _npy(H)), "labels": ("labels.npy", _npy(y))}


def test_every_form_option_is_a_top_level_json_key():
    assert OPTION_FIELDS == ("num_classes", "center", "global_mean", "remap_labels")
    assert set(OPTION_FIELDS) <= set(MeasureRequest.model_fields)
    assert set(OPTION_FIELDS) <= set(MeasureMultipartForm.model_fields)  # documented for the form too


def test_json_top_level_remap_labels(client):
    H, y = _data()
    r = client.post("/measure", json={"features": H.tolist(), "labels": (y + 1).tolist(), "remap_labels": True})
    assert r.status_code == 200, r.text
    assert_same(r.json(), measure(H, y + 1, remap_labels=True).to_dict())


def test_json_options_object_remap_labels_still_works(client):
    H, y = _data(1)
    r = client.post("/measure", json={"features": H.tolist(), "labels": (y + 1).tolist(),
                                      "options": {"remap_labels": True}})
    assert r.status_code == 200, r.text
    assert_same(r.json(), measure(H, y + 1, remap_labels=True).to_dict())


def test_json_top_level_keys_override_the_options_object_like_form_fields(client):
    H, y = _data(2)
    want = measure(H, y, center="global_mean", global_mean="sample").to_dict()
    body = {"features": H.tolist(), "labels": y.tolist(), "options": {"center": "none", "global_mean": "sample"},
            "center": "global_mean"}
    r = client.post("/measure", json=body)
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)
    form = client.post("/measure", files=_files(H, y),
                       data={"options": json.dumps({"center": "none", "global_mean": "sample"}),
                             "center": "global_mean"})
    assert form.status_code == 200, form.text
    assert_same(form.json(), want)


def test_multipart_single_field_remap_labels(client):
    H, y = _data(3)
    r = client.post("/measure", files=_files(H, y + 1), data={"remap_labels": "true"})
    assert r.status_code == 200, r.text
    assert_same(r.json(), measure(H, y + 1, remap_labels=True).to_dict())


def test_async_json_job_stores_the_merged_options(client, sessionmaker):
    from db import jobs as dbjobs

    H, y = _data(4)
    r = client.post("/measure?async=true", json={"features": H.tolist(), "labels": (y + 1).tolist(),
                                                 "remap_labels": True, "options": {"num_classes": 3}})
    assert r.status_code == 202, r.text
    with sessionmaker() as s:
        assert dbjobs.get_job(s, r.json()["id"]).config["options"] == {
            "num_classes": 3, "center": "none", "global_mean": "class_mean", "remap_labels": True}


@pytest.mark.parametrize("body, field", [
    ({"remap_labels": "maybe"}, "remap_labels"),
    ({"center": "middle"}, "center"),
    ({"num_classes": 1}, "num_classes"),
    ({"options": {"remap_labels": "maybe"}}, "options.remap_labels"),
])
def test_bad_json_options_name_the_key(client, body, field):
    H, y = _data()
    r = client.post("/measure", json={"features": H.tolist(), "labels": y.tolist(), **body})
    assert_problem(r, 422, field)


@pytest.mark.parametrize("send", ["json", "multipart"])
def test_labels_not_0_to_c_minus_1_say_how_to_remap_over_http(client, send):
    H, y = _data(5)
    if send == "json":
        r = client.post("/measure", json={"features": H.tolist(), "labels": (y + 1).tolist()})
    else:
        r = client.post("/measure", files=_files(H, y + 1))
    body = assert_problem(r, 422, "labels")
    assert "remap_labels" in body["detail"]
    assert "form field or JSON key remap_labels=true" in body["detail"], body["detail"]
    assert body["type"].endswith(":input-error") and body.get("expected")


def test_negative_labels_hint_too(client):
    H, y = _data(6)
    body = assert_problem(client.post("/measure", json={"features": H.tolist(), "labels": (y - 1).tolist()}),
                          422, "labels")
    assert "JSON key remap_labels=true" in body["detail"]


def test_other_input_errors_get_no_hint(client):
    H, y = _data(7)
    body = assert_problem(client.post("/measure", json={"features": H.tolist(), "labels": y[:-1].tolist()}),
                          422, "labels")
    assert "HTTP:" not in body["detail"]


@pytest.mark.parametrize("name", ["remap_labels", "num_classes", "center", "global_mean"])
def test_an_option_in_the_query_string_is_refused_not_ignored(client, name):
    H, y = _data()
    r = client.post(f"/measure?{name}=true", json={"features": H.tolist(), "labels": (y + 1).tolist()})
    body = assert_problem(r, 422, f"query.{name}")
    assert "JSON key" in body["detail"] and "form field" in body["detail"]
    r = client.post(f"/measure?{name}=true", files=_files(H, y))
    assert_problem(r, 422, f"query.{name}")


def test_openapi_json_body_documents_top_level_options(client):
    content = client.get("/openapi.json").json()["paths"]["/measure"]["post"]["requestBody"]["content"]
    json_props = content["application/json"]["schema"]["properties"]
    form_props = content["multipart/form-data"]["schema"]["properties"]
    for name in OPTION_FIELDS:
        assert name in json_props and name in form_props
