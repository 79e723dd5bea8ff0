"""`kvwire ingest` and `kvwire generate` against the in-memory transport over the tiny service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvwire import cli

from ..server.conftest import CharTokenizer
from .conftest import ServiceTransport, Setup, make_client


class Tokenizer(CharTokenizer):
    eos_token_id = None

    def decode(self, ids: list[int], **kw: Any) -> str:
        return super().decode(ids)


@pytest.fixture
def patched(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    import kvwire.model

    monkeypatch.setattr(cli, "_client", lambda args: make_client(ServiceTransport(setup.service), tmp_path))
    monkeypatch.setattr(kvwire.model, "load_model", lambda *a, **kw: (setup.model, Tokenizer()))
    return setup


def test_ingest_prints_the_context_id(
    patched: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello world " * 4)
    assert cli.main(["ingest", str(path), "--context-id", "notes"]) == 0
    out = capsys.readouterr().out
    assert "context notes: 48 tokens, 3 chunks" in out and out.strip().endswith("notes")


def test_ingest_of_a_missing_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ingest", "/nonexistent/file.txt"]) == 2
    assert "InvalidInputError: cannot read /nonexistent/file.txt" in capsys.readouterr().err


def test_generate_prints_answer_ttft_and_decisions(
    patched: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["generate", "--context", "ctx", " Q?", "--mode", "level:1", "--max-new-tokens", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "TTFT " in out and "fixed level" in out
    table = [line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(table) == len(patched.manifest.chunks) and all(" L1 " in line for line in table)


def test_generate_refuses_adaptive_without_slo(patched: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--context", "ctx", "Q", "--mode", "nonsense"]) == 2
    assert "unknown mode" in capsys.readouterr().err
