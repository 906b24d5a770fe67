"""Shared fixtures: an isolated cache per session, tiny models, and no network."""

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _interp_cache(tmp_path_factory):
    """Tests use their own cache dir, except the SmolLM2 conversion, which is shared (20 s)."""
    if "INTERP_CACHE" not in os.environ:
        os.environ["INTERP_CACHE"] = str(Path.home() / ".cache" / "interp")
    yield


class _NoNetwork(socket.socket):
    def connect(self, address):  # noqa: D401
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"interp tests must not use the network (tried {address})")
        return super().connect(address)


@pytest.fixture
def no_network(monkeypatch):
    """Block every non-loopback socket connection for the test."""
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    monkeypatch.setattr(socket, "create_connection",
                        lambda addr, *a, **k: (_ for _ in ()).throw(OSError(f"network blocked: {addr}")))
    yield


@pytest.fixture(scope="session")
def tiny_llama():
    from interp.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    from interp.models import load_model

    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    from interp.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tok():
    """SmolLM2's tokenizer alone (no model load), for tokenisation tests."""
    from transformers import AutoTokenizer

    from interp.models import smollm2_dir

    try:
        return AutoTokenizer.from_pretrained(str(smollm2_dir()))
    except Exception as e:  # pragma: no cover - only without the SmolLM2 cache
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
