import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from prunekit.compat import LOAD_KWARGS

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight LLaVA-1.5 saved to disk, as a real checkpoint would be."""
    from prunekit.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS).eval()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def _no_grad_and_clean(request):
    """No autograd in tests; a test that used the shared tiny model must leave no strategy attached to it."""
    with torch.no_grad():
        yield
    if "model" in request.fixturenames:
        from prunekit import PruningHandle

        model = request.getfixturevalue("model")
        assert PruningHandle.of(model) is None and "generate" not in model.__dict__, "a test left a strategy attached"
