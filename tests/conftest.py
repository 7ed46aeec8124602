"""Shared fixtures for the checkpoint tests: real models (resnet18 built once per session, a small CNN,
an LSTM language model). The helpers the tests import live in the sibling module ckpt_files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

if str(Path(__file__).parent) not in sys.path:  # sibling helper modules importable under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from ckpt_files import ConvNet, LSTMLanguageModel, randomize_buffers, state_of  # noqa: E402


@pytest.fixture(scope="session")
def resnet18_state() -> dict[str, torch.Tensor]:
    """resnet18 (weights=None) is built once per session; tests get its state dict, never the module."""
    torch.manual_seed(0)
    return state_of(randomize_buffers(torchvision.models.resnet18(weights=None)))


@pytest.fixture
def small_cnn() -> ConvNet:
    torch.manual_seed(1)
    return randomize_buffers(ConvNet())


@pytest.fixture
def lstm_model() -> LSTMLanguageModel:
    torch.manual_seed(2)
    return LSTMLanguageModel().eval()


@pytest.fixture(params=["resnet18", "small_cnn", "lstm"])
def model_state(request) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, state dict) of each real model."""
    if request.param == "resnet18":
        return "resnet18", request.getfixturevalue("resnet18_state")
    model = request.getfixturevalue("small_cnn" if request.param == "small_cnn" else "lstm_model")
    return request.param, state_of(model)


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", dest="fuzz_cases", type=int, default=None,
                     help="cases for tests/test_fuzz.py's mutational run (default: $CKPTVIZ_FUZZ_CASES or 2000)")
