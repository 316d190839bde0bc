"""Dataset display names: any file name a person gives (spaces, accents, other scripts) is kept as sent
and shown back; what could act as a path or hide its text is refused. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from .api_support import jsonl, make_api

DISPLAY_NAMES = ["my data.jsonl", "ü.jsonl", "données d'été (v2).jsonl", "训练 集.jsonl", "x" * 255]
REFUSED = [
    "../x",
    "/etc/shadow",
    "dir/x",
    "C:\\x\\y.jsonl",
    "..",
    ".hidden",
    "a\x00b",
    "line\nbreak",
    "tab\there",
    "bell\x07",
    "evil\u202egpj.jsonl",  # right-to-left override: shows as 'evil' + 'jsonl.jpg'
    " padded.jsonl",
    "x" * 256,
]


@pytest.fixture
def api(db_url: str, tmp_path: Path):
    api = make_api(tmp_path, db_url)
    _, h = api.tenant("names")
    return api, h


@pytest.mark.parametrize("name", DISPLAY_NAMES)
def test_a_file_name_is_kept_as_the_display_name_and_the_file_stored_by_id(api, name: str) -> None:
    api, h = api
    r = api.client.post("/v1/datasets", files={"file": (name, jsonl())}, headers=h)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == name and ds["id"].startswith("ds_")
    assert api.client.get(f"/v1/datasets/{ds['id']}", headers=h).json()["name"] == name
    assert [d["name"] for d in api.client.get("/v1/datasets", headers=h).json()["items"]] == [name]
    files = [p.name for p in api.settings.datasets_dir.rglob("*") if p.is_file()]
    assert files == [f"{ds['id']}.jsonl"]


def test_the_name_comes_from_the_query_the_form_or_rfc5987_filename_star_in_nfc(api) -> None:
    api, h = api
    c = api.client
    raw = c.post(
        "/v1/datasets", params={"name": "raw data.jsonl"}, content=jsonl(),
        headers={**h, "content-type": "application/x-ndjson"},
    )  # fmt: skip
    form = c.post(
        "/v1/datasets", files={"file": ("f.jsonl", jsonl())}, data={"name": "named à la form"}, headers=h
    )
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fallback.jsonl"; '
            f"filename*=UTF-8''u%CC%88%20nfd.jsonl\r\n\r\n"
        ).encode()
        + jsonl()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    star = c.post(
        "/v1/datasets",
        content=body,
        headers={**h, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert [r.status_code for r in (raw, form, star)] == [201, 201, 201], (raw.text, form.text, star.text)
    assert raw.json()["name"] == "raw data.jsonl" and form.json()["name"] == "named à la form"
    assert star.json()["name"] == "\u00fc nfd.jsonl"  # u + combining diaeresis, stored composed (NFC)


@pytest.mark.parametrize("name", REFUSED)
def test_path_tricks_and_control_characters_are_refused_with_422_and_leave_nothing(api, name: str) -> None:
    api, h = api
    c = api.client
    raw_part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n%s\r\n--zz--\r\n'
    sent = [
        c.post(
            "/v1/datasets",
            params={"name": name},
            content=jsonl(),
            headers={**h, "content-type": "text/plain"},
        ),
        c.post("/v1/datasets", files={"file": ("ok.jsonl", jsonl())}, data={"name": name}, headers=h),
    ]
    if "\\" not in name:  # (a Windows path as the file name: its last part is the name, as browsers send it)
        sent.append(  # the file name's bytes as they are (httpx would percent-encode control characters)
            c.post(
                "/v1/datasets",
                content=raw_part % (name.encode(), jsonl()),
                headers={**h, "content-type": "multipart/form-data; boundary=zz"},
            )
        )
    for r in sent:
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert (err["type"], err["field"]) == ("invalid_name", "name") and "control characters" in err[
            "message"
        ]
    assert c.get("/v1/datasets", headers=h).json()["total"] == 0
    assert [p for p in api.settings.datasets_dir.rglob("*") if p.is_file()] == []
