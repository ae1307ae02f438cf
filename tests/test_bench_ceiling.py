"""``python -m bench --ceiling`` variants (bench/ceiling_app.py) answer what the service answers, with
fresh uuids, and take out exactly the parts they name; otherwise their figures would mean nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from bench import ceiling_app, fixture
from service.app import create_app
from service.store import FeedbackStore

URL = f"/cds-services/{fixture.SERVICE_ID}"


def _without_uuids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_uuids(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [_without_uuids(v) for v in value]
    return value


def _uuids(cards: list[dict[str, Any]]) -> set[str]:
    return {card["uuid"] for card in cards} | {s["uuid"] for card in cards for s in card.get("suggestions", [])}


def _issued_rows(store: FeedbackStore) -> int:
    store.dispose()  # writes the write-behind queue
    store.ensure_schema()  # the app creates its tables on first use: none if nothing was recorded
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM issued_card")).scalar_one())


@pytest.mark.parametrize(("variant", "records_cards"), [("no-evaluation", True), ("protocol-only", False)])
def test_variant_answers_like_the_service_with_fresh_uuids(
    variant: str, records_cards: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = fixture.order_select()
    real = create_app({"require_auth": False, "database_url": f"sqlite:///{tmp_path / 'real.sqlite3'}"})
    expected = real.test_client().post(URL, json=body).get_json()["cards"]
    real.extensions["cmv_cds"]["store"].dispose()
    assert [card["summary"] for card in expected]  # the fixture does produce cards

    config = {"require_auth": False, "database_url": f"sqlite:///{tmp_path / variant}.sqlite3"}
    app = ceiling_app.build(variant, config, patch=monkeypatch.setattr)
    client = app.test_client()
    first, second = (client.post(URL, json=body).get_json()["cards"] for _ in range(2))

    assert _without_uuids(first) == _without_uuids(second) == _without_uuids(expected)
    assert _uuids(first).isdisjoint(_uuids(second))
    assert _issued_rows(app.extensions["cmv_cds"]["store"]) == (2 * len(expected) if records_cards else 0)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ceiling variant"):
        ceiling_app.build("no-rules")


def test_the_in_process_benchmark_runs_against_the_service_as_it_answers_now() -> None:
    """``python -m bench.edge`` checks the service's answer the way the load benchmark does (a dose card with an
    update suggestion), not by a card count that a new info card would break. Run as its own process: it swaps the
    evaluation out for its no-evaluation variant for good."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.edge", "--calls", "3", "--repeats", "1"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "service − floor" in done.stdout
    assert "no evaluation − floor" in done.stdout


def test_the_ceiling_refuses_a_compiled_service(capsys: pytest.CaptureFixture[str]) -> None:
    # The variants replace service functions at run time; compiled modules would bypass them silently.
    from bench import run

    with pytest.raises(SystemExit) as exited:
        run.main(["--ceiling"])
    assert exited.value.code == 2
    assert "--ceiling needs --interpreted" in capsys.readouterr().err
